"""A small fake of the Kaggle API endpoints the official `kaggle` client (2.x, over kagglesdk) calls for
`kernels push` and `kernels status`, with its auth and its error shape.

The client POSTs JSON to {endpoint}/api/v1/{service}/{method} (KaggleHttpClient._get_request_url); with
KAGGLE_API_ENVIRONMENT=LOCALHOST, KaggleApi's endpoint is http://localhost. Tests reach this server through
the standard http_proxy variable (requests honours it), so it listens on any free port and sees absolute URLs.

- security.OAuthService/IntrospectToken {token} -> {active, username}: how KaggleApi.authenticate resolves an
  access token (KAGGLE_API_TOKEN) to a user; an unknown token is {active: false}, as RFC 7662 has it.
- kernels.KernelsApiService/SaveKernel (ApiSaveKernelRequest) -> {ref, url, versionNumber, kernelId}: kernels_push.
- kernels.KernelsApiService/GetKernelSessionStatus {userName, kernelSlug} -> {status, failureMessage}.

Auth: `Authorization: Bearer <access token>` or HTTP Basic username:key (kaggle.json, KAGGLE_USERNAME/KAGGLE_KEY);
anything else is 401. Errors are JSON {code, message}, which the client raises as requests.HTTPError.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

USERS = {"alice": {"key": "alice-legacy-key-0123456789", "token": "KGAT_alice_token_0123456789abcdef"}}


class FakeKaggle:
    def __init__(self) -> None:
        self.requests: list[dict] = []  # every request: url, method, user, body
        self.kernels: dict[str, dict] = {}  # "owner/slug" -> the last SaveKernel body, version, status
        self.faults: list[tuple[int, dict[str, str]]] = []  # (status, headers) answered to the next requests
        self.hang = threading.Event()  # set: requests wait until `release` is set
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                url = urlsplit(self.path)  # absolute through a proxy: http://localhost/api/v1/...
                user = fake.user_of(self.headers.get("Authorization", ""))
                fake.requests.append({"url": self.path, "host": url.hostname, "method": url.path.rsplit("/", 1)[-1],
                                      "user": user, "body": body})
                if fake.hang.is_set():
                    fake.release.wait(30)
                if fake.faults:
                    status, headers = fake.faults.pop(0)
                    return self.reply(status, {"code": status, "message": "injected fault"}, headers)
                status, answer = fake.route(url.path, user, body)
                self.reply(status, answer)

            def reply(self, status: int, answer: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def user_of(authorization: str) -> str | None:
        kind, _, value = authorization.partition(" ")
        if kind == "Bearer":
            return next((name for name, u in USERS.items() if u["token"] == value), None)
        if kind == "Basic":
            name, _, key = base64.b64decode(value).decode().partition(":")
            return name if USERS.get(name, {}).get("key") == key else None
        return None

    def route(self, path: str, user: str | None, body: dict) -> tuple[int, dict]:
        if path == "/api/v1/security.OAuthService/IntrospectToken":
            name = next((n for n, u in USERS.items() if u["token"] == body.get("token")), None)
            return 200, {"active": True, "username": name} if name else {"active": False}
        if user is None:
            return 401, {"code": 401, "message": "Unauthenticated"}
        if path == "/api/v1/kernels.KernelsApiService/SaveKernel":
            owner, _, slug = body.get("slug", "").partition("/")
            if owner != user:
                return 403, {"code": 403, "message": f"Permission 'kernels.create' was denied for {owner}/{slug}"}
            ref = f"{owner}/{slug}"
            version = self.kernels.get(ref, {}).get("version", 0) + 1
            self.kernels[ref] = {"body": body, "version": version, "status": "QUEUED"}
            return 200, {"ref": f"/code/{ref}", "url": f"https://www.kaggle.com/code/{ref}", "versionNumber": version,
                         "kernelId": 1000 + len(self.kernels)}
        if path == "/api/v1/kernels.KernelsApiService/GetKernelSessionStatus":
            kernel = self.kernels.get(f"{body.get('userName')}/{body.get('kernelSlug')}")
            if kernel is None:
                return 404, {"code": 404, "message": "Not found"}
            return 200, {"status": kernel["status"], **({"failureMessage": kernel["failure"]} if "failure" in kernel else {})}
        return 404, {"code": 404, "message": f"no method {path}"}
