#!/usr/bin/env python3
"""Print the function app's app settings as infra/ declares them, as JSON, for tests/tests/infra.rs.

The Bicep is parsed with pycep-parser, as CI's infrastructure check parses it (scripts/check-infra.sh),
and the site's `appSettings` expression is followed through its variables, `loadJsonContent` of
infra/appsettings.json, and the module parameters main.bicep passes. Each setting comes out as
{"name", "value", "when"}: `value` is the literal text (Bicep interpolations kept as `${...}`) or
null for a computed value, `when` is null when every deployment has the setting, else the
main.bicep parameter that must be non-empty. A shape this reader does not know is an error, so a
change to the Bicep that it cannot follow fails the test instead of passing it unread.
"""
import ast
import json
import pathlib
import sys

from pycep import BicepParser

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


class Unsupported(Exception):
    pass


def parse(path):
    return BicepParser().parse(text=path.read_text())


def fn(expr, name):
    """The parameters of a call to `name`, or None."""
    if isinstance(expr, dict) and "function" in expr and expr["function"].get("type") == name:
        return expr["function"]["parameters"]
    return None


def conditional(expr):
    """(parameter, value-when-non-empty) of `empty(param) ? <empty> : value`, or None."""
    if not (isinstance(expr, dict) and "operator" in expr and expr["operator"].get("type") == "conditional"):
        return None
    ops = expr["operator"]["operands"]
    test = fn(ops["condition"], "empty")
    if test is None or not isinstance(test.get("item_to_test"), str) or ops["true_value"] not in ([], {}):
        raise Unsupported(f"a conditional other than `empty(param) ? [] : …`: {json.dumps(ops)[:200]}")
    return test["item_to_test"], ops["false_value"]


def names_with_conditions(expr):
    """A main.bicep module parameter that lists setting names: concat/union of literal lists or
    objects and `empty(param) ? [] : …` conditionals. Yields (name, when, value)."""
    args = fn(expr, "concat") or fn(expr, "union")
    if args is not None:
        for a in args.values():
            yield from names_with_conditions(a)
        return
    cond = conditional(expr)
    if cond is not None:
        param, value = cond
        for name, when, v in names_with_conditions(value):
            if when is not None:
                raise Unsupported("nested conditionals")
            yield name, param, v
        return
    if isinstance(expr, list) and all(isinstance(x, str) for x in expr):
        for x in expr:
            yield x, None, None
        return
    if isinstance(expr, dict) and all(isinstance(k, str) for k in expr) and "function" not in expr and "operator" not in expr:
        for k, v in expr.items():
            yield k, None, v if isinstance(v, str) else None
        return
    raise Unsupported(f"a setting list of unknown shape: {json.dumps(expr)[:200]}")


def main():
    app = parse(INFRA / "modules" / "functionapp.bicep")
    top = parse(INFRA / "main.bicep")
    module = next(
        (m for m in top.get("modules", {}).values() if m.get("detail", {}).get("path") == "modules/functionapp.bicep"),
        None,
    )
    if module is None:
        raise Unsupported("main.bicep has no module 'modules/functionapp.bicep'")
    passed = module["config"]["params"]
    variables = app["variables"]
    sources = {}
    for name, var in variables.items():
        load = fn(var["value"], "load_json_content")
        if load is not None:
            sources[name] = json.loads((INFRA / "modules" / load["file_path"]).read_text())
    sites = [r for r in app["resources"].values() if r["type"] == "Microsoft.Web/sites"]
    if len(sites) != 1:
        raise Unsupported("functionapp.bicep declares no single Microsoft.Web/sites")
    expr = sites[0]["config"]["properties"]["siteConfig"]["appSettings"]
    out = []

    def entries(e):
        args = fn(e, "concat")
        if args is not None:
            for a in args.values():
                entries(a)
        elif isinstance(e, str) and e in variables:
            entries(variables[e]["value"])
        elif isinstance(e, list):
            for item in e:
                if not (isinstance(item, dict) and set(item) == {"name", "value"} and isinstance(item["name"], str)):
                    raise Unsupported(f"an app setting of unknown shape: {json.dumps(item)[:200]}")
                out.append({"name": item["name"], "value": item["value"] if isinstance(item["value"], str) else None, "when": None})
        elif isinstance(e, dict) and "loop_type" in e:
            loop = e["loop_type"]["detail"]
            if "object_name" in loop:
                # pycep-parser 0.5 (checkov's): `for s in items(X)` is an object loop over X, an
                # expression it hands back as Python's repr of its tree.
                target = loop["object_name"]
                if isinstance(target, str) and target.startswith("{"):
                    target = ast.literal_eval(target)
                items, over = {"arg_1": target}, None
            else:
                over = loop["array_name"]
                items = fn(over, "items")
            if items is not None:
                # [for s in items(X): { name: s.key, value: s.value }] over a loaded JSON object or a parameter.
                target = items["arg_1"]
                acc = isinstance(target, dict) and target.get("operator", {}).get("type") == "property_accessor"
                if acc and target["operator"]["operands"]["operand_1"] in sources:
                    obj = sources[target["operator"]["operands"]["operand_1"]][target["operator"]["operands"]["operand_2"]]
                    for k, v in obj.items():
                        out.append({"name": k, "value": v, "when": None})
                elif isinstance(target, str) and target in passed:
                    for name, when, v in names_with_conditions(passed[target]):
                        out.append({"name": name, "value": v, "when": when})
                else:
                    raise Unsupported(f"a loop over {json.dumps(target)[:200]}")
            elif isinstance(over, str) and over in passed:
                # [for s in secretSettings: { name: s, value: '@Microsoft.KeyVault(…${source.secrets[s].secret})' }]
                template = e["config"]["value"]
                source = next((n for n in sources if f"{n}.secrets[" in template), None)
                if source is None:
                    raise Unsupported(f"a loop over {over} whose value names no loaded secrets")
                secrets = sources[source]["secrets"]
                for name, when, _ in names_with_conditions(passed[over]):
                    if name not in secrets:
                        raise Unsupported(f"{name} is passed as a secret setting but infra/appsettings.json has no such secret")
                    value = template.replace(f"${{{source}.secrets[s].secret}}", secrets[name]["secret"])
                    out.append({"name": name, "value": value, "when": when})
            else:
                raise Unsupported(f"a loop over {json.dumps(over)[:200]}")
        else:
            raise Unsupported(f"an appSettings part of unknown shape: {json.dumps(e)[:200]}")

    entries(expr)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    try:
        main()
    except Unsupported as e:
        sys.exit(f"bicep-app-settings: cannot follow infra/modules/functionapp.bicep's appSettings: {e}")
