//! deploychain's one-machine stack: a local Azure Functions host that runs the real `handler`
//! through the real custom-handler protocol, the embedded durable Service Bus served over the
//! Service Bus REST subset, simulators for CI and image builds, and the `deploychain` command.
//!
//! Nothing here is linked into the deployed handler; the handler cannot tell this stack from Azure.

pub mod client;
pub mod config;
pub mod host;
pub mod secrets;
pub mod sim;
pub mod stack;
pub mod watch;

pub const USAGE: &str = "\
deploychain — the deployment chain on one machine

  deploychain up [--port 7071] [--bus-port 7072] [--data-dir DIR] [--policy FILE] [--reset] [--release]
      start the local Functions host, the embedded Service Bus and the simulators; show runs as they go
  deploychain send github EVENT [FILE]     sign FILE with the local secret and POST it as a GitHub webhook
                                           (`send github push` without FILE pushes a new commit to the
                                           first GitHub app of the policy; --branch NAME to choose)
  deploychain send azure-devops FILE       POST FILE as an Azure DevOps service hook
  deploychain runs [ID] [--commit SHA]     what each run did and what it waits for
  deploychain approve LINK [--reject] [--comment TEXT]
                                           decide an approval from its signed link (what the page's button does)
  deploychain reset [--data-dir DIR]       delete the local data (bus, state, secrets)
";
