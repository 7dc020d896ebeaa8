"""A TCP proxy that can cut its target off: the outage switch for reliability drills.

Point a client (the gateway's ``SLUICE_DATABASE_URL``) at the proxy instead of the real
server; ``cut()`` closes the listening socket (new connections are refused) and resets
every open connection, exactly as a database host that went away; ``restore()`` listens
again on the same port.

In tests::

    proxy = TcpProxy("127.0.0.1", 5432).start()   # proxy.port is a free port
    proxy.cut(); ...; proxy.restore(); proxy.stop()

By hand (SIGUSR1 cuts, SIGUSR2 restores)::

    python -m loadtests.tcp_proxy --listen 6432 --target 127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import threading


class TcpProxy:
    """Runs its own event loop in a daemon thread, so blocking callers can use it."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port or _free_port(listen_host)
        self.connections = 0  # accepted since start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tcp-proxy")
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    # -- control (any thread) -------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def is_cut(self) -> bool:
        return self._server is None

    def _call(self, coro) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the loop's side ------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # RST, not a polite FIN: the peer sees a dead link
        self._open.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port to listen on")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = TcpProxy(host, int(port), listen_port=args.listen).start()
    signal.signal(signal.SIGUSR1, lambda *_: (proxy.cut(), print("cut", flush=True)))
    signal.signal(signal.SIGUSR2, lambda *_: (proxy.restore(), print("restored", flush=True)))
    print(f"proxy 127.0.0.1:{proxy.port} -> {args.target} (SIGUSR1 cut, SIGUSR2 restore)",
          flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            signal.pause()


if __name__ == "__main__":
    main()
