"""A simulated synced folder (Google Drive between Colab VMs): each machine sees its own copy.

A syncer thread notices every file a machine writes in its copy and carries that version to each other
copy after its own random delay (0..max_delay_s), so files arrive out of order and copies disagree for a
while. As on Drive, a copy never goes back to an older version of a file, and a file arrives whole
(written beside and renamed). Hidden files (a writer's temp files) are not synced.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path


class SyncedFolders:
    def __init__(self, root: Path, machines: list[str], max_delay_s: float, seed: int = 0):
        self.copies = {m: root / m / "sweep" for m in machines}
        for folder in self.copies.values():
            folder.mkdir(parents=True)
        self.max_delay_s = max_delay_s
        self.carried = 0
        self._random = random.Random(seed)
        self._stamps: dict[tuple[str, str], tuple[int, int, int]] = {}  # (machine, file) -> stat we know of
        self._version: dict[str, int] = {}  # file -> newest version written anywhere
        self._arrived: dict[tuple[str, str], int] = {}  # (machine, file) -> version it holds
        self._pending: list[tuple[float, str, str, int, bytes]] = []  # (due, machine, file, version, content)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._scan()
                self._deliver()
            time.sleep(0.02)

    def _scan(self) -> None:
        for machine, folder in self.copies.items():
            for path in folder.iterdir():
                if path.name.startswith("."):
                    continue
                try:
                    st = path.stat()
                    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                    if self._stamps.get((machine, path.name)) == stamp:
                        continue
                    content = path.read_bytes()
                except FileNotFoundError:
                    continue
                self._stamps[(machine, path.name)] = stamp
                version = self._version[path.name] = self._version.get(path.name, 0) + 1
                self._arrived[(machine, path.name)] = version
                for other in self.copies:
                    if other != machine:
                        due = time.monotonic() + self._random.uniform(0, self.max_delay_s)
                        self._pending.append((due, other, path.name, version, content))

    def _deliver(self) -> None:
        now, waiting = time.monotonic(), []
        for item in self._pending:
            due, machine, name, version, content = item
            if due > now:
                waiting.append(item)
            elif version > self._arrived.get((machine, name), 0):
                target = self.copies[machine] / name
                temp = target.with_name(f".{name}.sync")
                temp.write_bytes(content)
                os.replace(temp, target)
                st = target.stat()
                self._stamps[(machine, name)] = (st.st_mtime_ns, st.st_size, st.st_ino)
                self._arrived[(machine, name)] = version
                self.carried += 1
        self._pending = waiting

    def settle(self, timeout_s: float = 30) -> None:
        """Wait until every copy holds the newest version of every file."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(self.max_delay_s + 0.1)
            with self._lock:
                settled = not self._pending and all(self._arrived.get((m, f)) == v for m in self.copies for f, v in self._version.items())
            if settled:
                return
        raise TimeoutError("the synced folder did not settle")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
