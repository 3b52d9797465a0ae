//! deploychain's one-machine stack: a local Azure Functions host that runs the real `handler`
//! through the real custom-handler protocol, the embedded durable Service Bus served over the
//! Service Bus REST subset, a local ARM endpoint with simulated VM scale sets, simulators for CI
//! and image builds, and the `deploychain` command.
//!
//! Nothing here is linked into the deployed handler; the handler cannot tell this stack from Azure.

pub mod arm;
pub mod ci;
pub mod client;
pub mod config;
pub mod host;
pub mod k8s;
pub mod package;
pub mod secrets;
pub mod settings;
pub mod sim;
pub mod stack;
pub mod status;
pub mod watch;

pub const USAGE: &str = "\
deploychain — the deployment chain on one machine

  deploychain up [--port 7071] [--bus-port 7072] [--arm-port 7073] [--status-port 7070] [--data-dir DIR] [--policy FILE]
                 [--config FILE] [--reset] [--package ZIP | --handler PATH]
      package the function app as `deploychain package` does (or take ZIP, or package the handler at
      PATH) and run it from that zip: the local Functions host, the embedded Service Bus, the local ARM
      endpoint with the policy's scale sets and the simulators; show runs as they go. The local
      configuration is ./deploychain.local.toml in the repository root if there is one, or FILE
  deploychain send github EVENT [FILE]     sign FILE with the local secret and POST it as a GitHub webhook
                                           (`send github push` without FILE pushes a new commit to the
                                           first GitHub app of the policy; --branch NAME to choose,
                                           --commit PREFIX to start the commit id with PREFIX)
  deploychain send azure-devops FILE       POST FILE as an Azure DevOps service hook
  deploychain runs [show ID] [--commit SHA] [--json]
                                           each run and what it waits for, on whom, since when;
                                           with an id, every step on a timeline
  deploychain scalesets [--arm-url URL]    what each scale set of the policy runs (image, run, instances and
                                           their health), from the local ARM endpoint
  deploychain dlq list [--type T] [--run R] [--reason X] [--older-than 1h] [--entity E]
  deploychain dlq show MESSAGE-ID
  deploychain dlq replay (IDS… | filters | --all) [--dry-run] [--rate 10]
  deploychain dlq purge (IDS… | filters | --all) [--dry-run] [--yes]
                                           dead-lettered and parked messages, on the local bus or on
                                           Azure (--connection-string, or ServiceBusConnection)
  deploychain approve LINK [--reject] [--comment TEXT]
                                           decide an approval from its signed link (what the page's button does)
  deploychain reset [--data-dir DIR]       delete the local data (bus, state, secrets)
  deploychain package [--out DIR] [--policy FILE]
                                           build the release handler (linux-x64, static: musl) and stage
                                           the function app: DIR/functionapp/ and DIR/functionapp.zip
                                           (default target/), the handler executable (mode 755)
";
