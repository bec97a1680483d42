"""A local stand-in for the parts of the Hugging Face Hub HTTP API that huggingface_hub (2.x) calls for `whoami`,
`create_repo` and `upload_folder` with the legacy LFS transfer (HF_HUB_DISABLE_XET=1: the Xet protocol's chunk
store is out of scope). Clients reach it through HF_ENDPOINT.

Each behaviour and where it comes from:
- Auth is `Authorization: Bearer <token>` (huggingface_hub utils/_headers.py build_hf_headers). No token, or an
  unknown one, is 401; an unknown one carries X-Error-Message "Invalid credentials in Authorization header", the
  header hf_raise_for_status (utils/_http.py) tells apart from a missing repo's 401.
- GET /api/whoami-v2 -> {type, name, auth: {accessToken: {role}}}: HfApi.whoami; roles "read" and "write".
- POST /api/repos/create {name, organization, visibility, type} -> {url, name, id}. A read token, or another's
  namespace, is 403 "You don't have the rights to create a model under this namespace" (in X-Error-Message and
  the body; huggingface_hub PR #2053, nlp-with-transformers/notebooks#60). An existing repo is 409 "You already
  created this model repo" with its url in the body: HfApi.create_repo(exist_ok=True) passes on a 409 and reads
  the body's "url".
- GET /api/models/{repo}[/revision/main] -> {id, sha, private, siblings} (HfApi.model_info; create_commit reads
  it when nothing changed); a missing or unreadable repo is 401 with X-Error-Code
  RepoNotFound (the Hub hides private repos; utils/_http.py maps it to RepositoryNotFoundError).
- POST /api/models/{repo}/preupload/{revision} {files: [{path, sample, size}]} -> {files: [{path, uploadMode,
  shouldIgnore, oid}]} (_commit_api._fetch_upload_modes): "lfs" for the patterns of the .gitattributes the Hub
  puts in every new model repo (*.safetensors, *.bin, *.pt, ...) and for files over 10 MB, else "regular".
- POST /{repo}.git/info/lfs/objects/batch (Git LFS batch API, lfs.post_lfs_batch_info) -> per object an upload
  and a verify action, or no actions when the Hub holds the object already; then PUT to the upload href (the
  object's bytes, whose sha256 must be its oid) and POST {oid, size} to the verify href (lfs.lfs_upload, which
  sends the HF token there too). The verify href is the repo's own (/{repo}.git/info/lfs/objects/verify, an
  assumption: the Git LFS batch spec lets a server name any); size must be the uploaded object's.
- POST /api/models/{repo}/commit/{revision}, Content-Type application/x-ndjson (_commit_api._send_commit): a
  "header" line {summary, description} first, then "file" {path, content, encoding: base64}, "lfsFile" {path,
  algo: sha256, oid, size} (an oid never uploaded, or a size not the object's, is refused: 422) or "deletedFile"
  {path} lines -> {commitUrl, commitOid}. A "file" line for what preupload calls "lfs" (a pattern of the repo's
  .gitattributes, or over 10 MB) is refused, 400, with the message users report from the Hub's check of pushes
  ("Your push was rejected because it contains binary files" / "files larger than 10 MiB"; the status is assumed).
  Writing (preupload, LFS batch and verify, commit) needs a write token of the repo's owner: else 403.
- Only the `main` revision exists: another is 404 with X-Error-Code RevisionNotFound.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.zip")
LFS_SIZE = 10 * 2**20


class FakeHub:
    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user, role)
        self.repos: dict[str, dict] = {}  # "user/name" -> {private, files: {path: bytes}, commits: [summary]}
        self.lfs: dict[str, bytes] = {}  # oid -> bytes, once uploaded and verified
        self.uploaded: dict[str, bytes] = {}  # oid -> bytes, uploaded and not yet verified
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def handle_one(self, method: str) -> None:
                body = self.read_body()
                path = unquote(urlsplit(self.path).path)
                status, answer, headers = fake.route(method, path, self.headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # httpx streams a file upload in chunks
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def do_GET(self) -> None:
                self.handle_one("GET")

            def do_POST(self) -> None:
                self.handle_one("POST")

            def do_PUT(self) -> None:
                self.handle_one("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_token(self, user: str, role: str = "write") -> str:
        token = f"hf_{role}_{user}_{len(self.tokens):04d}" + "x" * 20
        self.tokens[token] = (user, role)
        return token

    def add_repo(self, repo_id: str, private: bool = True) -> None:
        self.repos[repo_id] = {"private": private, "files": {}, "commits": []}

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def error(status: int, message: str, code: str | None = None) -> tuple[int, dict, dict]:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        return status, {"error": message}, headers

    def route(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, dict]:
        kind, _, token = (headers.get("Authorization") or "").partition(" ")
        user, role = self.tokens.get(token, (None, None)) if kind == "Bearer" else (None, None)
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            # A presigned storage URL in the real Hub: the URL itself is the credential.
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return self.error(400, "uploaded bytes do not match the oid")
            self.uploaded[m.group(1)] = body
            return 200, {}, {}
        if token and user is None:
            return self.error(401, "Invalid credentials in Authorization header")
        if user is None:
            return self.error(401, "Unauthorized")
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": user,
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}}, {}
        if method == "POST" and path == "/api/repos/create":
            return self.create(user, role, json.loads(body))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/main)?", path):
            repo = self.repos.get(m.group(1))
            if repo is None or (repo["private"] and m.group(1).split("/")[0] != user):
                return self.error(401, "Repository not found", "RepoNotFound")
            return 200, {"id": m.group(1), "private": repo["private"], "sha": self.head(m.group(1)),
                         "siblings": [{"rfilename": p} for p in sorted(repo["files"])]}, {}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path):
            repo_id, action, revision = m.groups()
            if (refused := self.writable(repo_id, user, role, revision)) is not None:
                return refused
            if action == "preupload":
                return 200, {"files": [self.upload_mode(repo_id, f) for f in json.loads(body)["files"]],
                             "commitOid": self.head(repo_id)}, {}
            if headers.get("Content-Type") != "application/x-ndjson":
                return self.error(400, "commit payload must be application/x-ndjson")
            return self.commit(repo_id, body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path):
            if (refused := self.writable(m.group(1), user, role, "main")) is not None:
                return refused
            return self.lfs_batch(m.group(1), json.loads(body)) if m.group(2) == "batch" else self.verify(json.loads(body))
        return self.error(404, f"no route {method} {path}")

    def create(self, user: str, role: str, payload: dict) -> tuple[int, dict, dict]:
        if payload.get("type", "model") != "model":
            return self.error(400, "only model repos here")
        namespace = payload.get("organization") or user
        if role != "write" or namespace != user:
            return self.error(403, "You don't have the rights to create a model under this namespace")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, \
                {"X-Error-Message": "You already created this model repo"}
        self.add_repo(repo_id, private=payload.get("visibility", "public") != "public")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": f"{len(self.repos):024x}"}, {}

    def writable(self, repo_id: str, user: str, role: str, revision: str) -> tuple[int, dict, dict] | None:
        if repo_id not in self.repos:
            return self.error(404, "Repository not found", "RepoNotFound")
        if role != "write" or repo_id.split("/")[0] != user:
            return self.error(403, "You don't have the rights to write to this repository")
        if revision != "main":
            return self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return None

    def upload_mode(self, repo_id: str, file: dict) -> dict:
        lfs = file["size"] > LFS_SIZE or any(fnmatch.fnmatch(file["path"], p) for p in LFS_PATTERNS)
        held = self.repos[repo_id]["files"].get(file["path"])
        return {"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                "oid": None if held is None else hashlib.sha256(held).hexdigest() if lfs else git_blob_oid(held)}

    def verify(self, sent: dict) -> tuple[int, dict, dict]:
        pending = self.uploaded.get(sent.get("oid"))
        if pending is None or sent.get("size") != len(pending):
            return self.error(404, "object not uploaded")
        self.lfs[sent["oid"]] = self.uploaded.pop(sent["oid"])
        return 200, {"success": True}, {}

    def lfs_batch(self, repo_id: str, request: dict) -> tuple[int, dict, dict]:
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            return self.error(422, "only basic uploads here")
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def commit(self, repo_id: str, body: bytes) -> tuple[int, dict, dict]:
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self.error(400, "commit payload is not ndjson")
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self.error(400, "a commit starts with a header line holding its summary")
        files = dict(self.repos[repo_id]["files"])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                data = base64.b64decode(value["content"])
                if self.upload_mode(repo_id, {"path": value["path"], "size": len(data)})["uploadMode"] == "lfs":
                    return self.error(400, "Your push was rejected because it contains "
                                      + ("files larger than 10 MiB" if len(data) > LFS_SIZE else "binary files")
                                      + ". Please use Git LFS to store them")
                files[value["path"]] = data
            elif key == "lfsFile" and value.get("algo") == "sha256":
                if value["oid"] not in self.lfs or value.get("size") != len(self.lfs[value["oid"]]):
                    return self.error(422, "Your push was rejected because an LFS pointer pointed to a file that "
                                           "does not exist")
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile" and value.get("path") in files:
                del files[value["path"]]
            else:
                return self.error(400, f"bad commit line {key!r}")
        repo = self.repos[repo_id]
        repo["files"] = files
        repo["commits"].append(lines[0]["value"]["summary"])
        return 200, {"success": True, "commitOid": self.head(repo_id), "commitUrl": f"{self.url}/{repo_id}/commit/"
                                                                                    f"{self.head(repo_id)}"}, {}

    def head(self, repo_id: str) -> str:
        repo = self.repos[repo_id]
        return hashlib.sha1(json.dumps([repo["commits"], sorted(repo["files"])]).encode()).hexdigest()


def git_blob_oid(data: bytes) -> str:
    """What git names a regular file by (and the Hub's preupload answers as its oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
