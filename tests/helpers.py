"""Small helpers the tests share: free ports, status lookups, request arguments."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any

from mlx_hub.testing.tinymodel import text_only_logit_bias

#: The checkout under test: a child Python imports mlx_hub from here, not from another install.
REPO = Path(__file__).resolve().parents[1]


def checkout_env() -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH``, for a child Python script."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_address() -> str | None:
    """A non-loopback IPv4 address of this machine, where it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.200", 9))  # no packet is sent; this only picks the route's source
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def free_range(width: int = 8) -> int:
    """A starting port with ``width`` free ports above it (checked, not guaranteed)."""
    for _ in range(50):
        start = free_port()
        if start + width > 65535:
            continue
        ok = True
        for port in range(start, start + width):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")


class Drain(threading.Thread):
    """Everything a child process writes to ``stream`` (a pipe, or a pseudo-terminal's leader), read
    on a thread until the child closes it.

    A test that stops reading while it waits for the child (to show something, to exit) lets the
    pipe or terminal buffer fill up, and the child then blocks in a write and never gets there. This
    reads all the time. It owns ``stream`` and closes it at the end.
    """

    def __init__(self, stream: IO[bytes]):
        super().__init__(daemon=True, name="drain")
        self.stream = stream
        self._data = bytearray()
        self._closed = False
        self._grew = threading.Condition()
        self.start()

    def run(self) -> None:
        chunk = b"-"
        try:
            while chunk:
                try:
                    chunk = os.read(self.stream.fileno(), 65536)
                except OSError:  # EIO: a terminal whose other side closed with the process
                    chunk = b""
                with self._grew:
                    self._data += chunk
                    self._grew.notify_all()
        finally:
            with self._grew:
                self._closed = True
                self._grew.notify_all()
            self.stream.close()

    @property
    def text(self) -> str:
        with self._grew:
            return self._data.decode(errors="replace")

    def wait_for(self, shown: str, timeout: float, times: int = 1) -> bool:
        """Whether ``shown`` appears (``times`` times) within ``timeout`` s; False once the child
        closed its end without it."""
        deadline = time.monotonic() + timeout
        with self._grew:
            while self._data.count(shown.encode()) < times:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._grew.wait(left)
        return True

    def finish(self, timeout: float = 30) -> str:
        """Everything written, once the child has closed its end (at most ``timeout`` s from now)."""
        self.join(timeout)
        return self.text


def hello(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """The chat request the tests send: one greeting, a short answer, any extra fields."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        **extra,
    }


def text_only(model_path: str | Path) -> dict[str, Any]:
    """Request arguments that make a generated model answer with text, never an early stop.

    A random model may pick its end-of-turn token first and reply with nothing;
    tests that assert on content send this. A folder without a tokenizer (a test
    of a broken model) gets no bias and fails the way it would anyway.
    """
    try:
        return {"logit_bias": text_only_logit_bias(model_path)}
    except (OSError, ValueError, KeyError):
        return {}


def base_url(hub: Any, name: str) -> str:
    return f"http://127.0.0.1:{hub.slots[name].port}/v1"


def meta(hub: Any, name: str) -> dict[str, Any]:
    for row in hub.status()["models"]:
        if row["id"] == name:
            return row["metadata"]
    raise KeyError(name)


class LiveController:
    """A hub plus its controller app on a real loopback port, in this event loop."""

    def __init__(self, hub: Any, port: int):
        from mlx_hub.web.controller import build_controller_app
        from mlx_hub.web.server import AppServer

        self.hub = hub
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.shutdowns: list[bool] = []
        app = build_controller_app(hub, request_shutdown=lambda: self.shutdowns.append(True))
        self.server = AppServer(app, "127.0.0.1", port, name="controller")

    async def __aenter__(self) -> LiveController:
        await self.server.start()
        await self.hub.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.hub.activity.close_streams()  # open event and log streams end, so the server stops at once
        await self.server.stop()
        await self.hub.shutdown()


def cache_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder`` out as the cache does: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def hf_checkpoint(source: Path, target: Path) -> Path:
    """A Hugging Face-format copy of a generated model: the same tensors, saved as PyTorch would tag them."""
    import mlx.core as mx

    shutil.copytree(source, target)
    weights = mx.load(str(source / "model.safetensors"))
    mx.save_safetensors(str(target / "model.safetensors"), weights, metadata={"format": "pt"})
    return target


def harmony_vocab(folder: Path) -> Path:
    """A folder holding ``o200k_base.tiktoken``, for ``TIKTOKEN_ENCODINGS_BASE``.

    gpt-oss's Harmony parser loads OpenAI's o200k vocabulary, which it would
    download; LiteLLM (a test dependency) ships the same file in tiktoken's
    cache naming (the SHA-1 of its URL), so the tests read it from there, offline.
    """
    import litellm.litellm_core_utils.tokenizers as bundled

    source = Path(bundled.__file__).parent / "fb374d419588a4632f3f557e76b4b70aebbca790"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / "o200k_base.tiktoken")
    return folder


def long_chat(model: str, words: int, max_tokens: int, *, offset: int = 0, **extra: Any) -> dict[str, Any]:
    """A chat request whose one message is ``words`` words (about as many tokens with the test tokenizer).

    ``offset`` starts the text elsewhere in the corpus, so two requests share no
    prefix that upstream's prompt cache would reuse.
    """
    from mlx_hub.testing.tinymodel import _CORPUS

    corpus = _CORPUS.split()
    text = " ".join(corpus[(offset + i) % len(corpus)] for i in range(words))
    return {"model": model, "messages": [{"role": "user", "content": f"{offset} {text}"}],
            "max_tokens": max_tokens, **extra}  # fmt: skip


def request_room(path: str | Path, max_tokens: int = 5, **entry: Any) -> int:
    """What one ``hello`` request to the model at ``path`` reserves under a budget (KV cache, prefill)."""
    from mlx_hub.config import ModelConfig
    from mlx_hub.engine import reservation

    options = {"context_length": 2048, **entry}
    model = ModelConfig(name="m", model_path=str(path), **options)
    return reservation.estimate_request(model, hello("m", max_tokens), reservation.PromptCounter()).bytes
