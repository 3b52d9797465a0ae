"""A fake Azure Functions custom handler for the local host's tests (Python 3 standard library only).

The local host starts it as `python3 handler.py` in the app root (host.json customHandler). It
listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT, answers GET / (readiness), and answers
POST /{FunctionName} with the custom-handler envelope, behaving as the invocation asks.

Every event is appended as one JSON line to the file named by the app setting FAKE_RECORD:
  {"event": "listening", "pid", "t", "port"}                    when the server socket is bound
  {"event": "ready", "pid", "t"}                                each GET /
  {"event": "start", "pid", "t", "id", "function", "behave",    each invocation, before it behaves
   "envelope", "headers", "env", "cwd"}
  {"event": "end", "pid", "t", "id", "function", "status"}      just before the answer is written
  {"event": "exit", "pid", "t", "id", "function"}               just before os._exit(1)
`t` is time.time(); `id` is the X-Azure-Functions-InvocationId header.

The behaviour is taken from, in this order: Metadata.ApplicationProperties.behave (Service Bus),
the query parameter `behave` (HTTP), or the field `behave` of a JSON-object body (HTTP Body, or the
Service Bus message body, whether string- or binary-encoded). It may be a list: item
DeliveryCount-1 is used (the last one once the list runs out). Behaviours:
  ok (default)  HTTP: Outputs.res = 201 with header X-Echo and a JSON text body; others: empty Outputs
  fail          500 with a JSON body
  slow:S        sleep S seconds (float), then ok
  exit          os._exit(1) in the middle of the request
  null          200, application/json, `null`
  text          200, text/plain
  badres        200, JSON whose Outputs.res is a plain string (not an HTTP response object)
  answer        200, JSON {"Outputs": <body.outputs>, "Logs": [], "ReturnValue": <body.returnValue>}
                from the HTTP request's JSON body (output bindings and $return as the test gives them)

FAKE_STARTUP_DELAY (seconds) delays binding the port, to observe the host's readiness wait.
"""

import base64
import binascii
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECORD = os.environ.get("FAKE_RECORD")
LOCK = threading.Lock()
ENV_PREFIXES = ("FUNCTIONS_", "FAKE_")


def record(event):
    if not RECORD:
        return
    event.setdefault("pid", os.getpid())
    event.setdefault("t", time.time())
    line = json.dumps(event) + "\n"
    with LOCK:
        with open(RECORD, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def json_object(value):
    """The JSON object a Data value or body holds, undoing the host's string encoding or base64."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    try:
        v = json.loads(value)
        if isinstance(v, str):
            v = json.loads(v)
        if isinstance(v, dict):
            return v
    except ValueError:
        pass
    try:
        v = json.loads(base64.b64decode(value, validate=True))
        if isinstance(v, dict):
            return v
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    return None


def is_http(envelope):
    return any(isinstance(v, dict) and "Method" in v for v in (envelope.get("Data") or {}).values())


def behaviour(envelope):
    data = envelope.get("Data") or {}
    meta = envelope.get("Metadata") or {}
    behave = None
    props = meta.get("ApplicationProperties")
    if isinstance(props, dict) and "behave" in props:
        behave = props["behave"]
    for v in data.values():
        if behave is not None:
            break
        if isinstance(v, dict) and "Method" in v:
            query = v.get("Query") or {}
            if "behave" in query:
                behave = query["behave"]
                break
            obj = json_object(v.get("Body"))
        else:
            obj = json_object(v)
        if obj is not None and "behave" in obj:
            behave = obj["behave"]
    if isinstance(behave, list):
        try:
            n = int(json.loads(meta.get("DeliveryCount", "1")))
        except (ValueError, TypeError):
            n = 1
        behave = behave[min(max(n - 1, 0), len(behave) - 1)] if behave else None
    return behave or "ok"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def answer(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            record({"event": "ready"})
            self.answer(200, "text/plain", b"ready")
        else:
            self.answer(404, "text/plain", b"not found")

    def do_POST(self):
        function = self.path.lstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        invocation = self.headers.get("X-Azure-Functions-InvocationId")
        try:
            envelope = json.loads(raw)
        except ValueError:
            envelope = {"unparsable": raw.decode("utf-8", "replace")}
        behave = behaviour(envelope)
        record(
            {
                "event": "start",
                "id": invocation,
                "function": function,
                "behave": behave,
                "envelope": envelope,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
                "cwd": os.getcwd(),
            }
        )
        if behave.startswith("slow:"):
            time.sleep(float(behave[len("slow:"):]))
            behave = "ok"
        if behave == "exit":
            record({"event": "exit", "id": invocation, "function": function})
            os._exit(1)
        if behave == "fail":
            status, ctype, body = 500, "application/json", {"Outputs": {}, "Logs": ["fake failure"], "ReturnValue": None}
        elif behave == "null":
            status, ctype, body = 200, "application/json", None
        elif behave == "text":
            status, ctype, body = 200, "text/plain", "plain text"
        elif behave == "answer":
            req = next(v for v in envelope["Data"].values() if isinstance(v, dict) and "Method" in v)
            given = json_object(req.get("Body")) or {}
            status, ctype, body = 200, "application/json", {"Outputs": given.get("outputs") or {}, "Logs": [], "ReturnValue": given.get("returnValue")}
        elif behave == "badres":
            status, ctype, body = 200, "application/json", {"Outputs": {"res": "plain text"}, "Logs": [], "ReturnValue": None}
        elif is_http(envelope):
            req = next(v for v in envelope["Data"].values() if isinstance(v, dict) and "Method" in v)
            echo = json.dumps({"function": function, "params": req.get("Params"), "query": req.get("Query")}, sort_keys=True)
            res = {"statusCode": 201, "headers": {"X-Echo": req.get("Method", "") + " " + function}, "body": echo}
            status, ctype, body = 200, "application/json", {"Outputs": {"res": res}, "Logs": ["handled " + function], "ReturnValue": None}
        else:
            status, ctype, body = 200, "application/json", {"Outputs": {}, "Logs": [], "ReturnValue": None}
        payload = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode("utf-8")
        record({"event": "end", "id": invocation, "function": function, "status": status})
        self.answer(status, ctype, payload)


def main():
    delay = float(os.environ.get("FAKE_STARTUP_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    record({"event": "listening", "port": port})
    server.serve_forever()


if __name__ == "__main__":
    main()
