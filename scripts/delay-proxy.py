#!/usr/bin/env python3
"""A TCP proxy that adds DELAY_MS of one-way latency in each direction, for
scripts/measure-resume on kernels without `netem`.

    delay-proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS

Bytes keep their order and each arrives DELAY_MS after it was read; a new
connection reaches the target three one-way delays after it was accepted,
when the client's first bytes would have crossed a real link (SYN, SYN-ACK,
then data). A reset on one side resets the other one delay later; an end of
stream closes it.
"""
import asyncio
import sys
import time


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def carry(reader, queue, delay):
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data or b"", bool(data)))
            if not data:
                return
    except (ConnectionError, OSError):
        queue.put_nowait((time.monotonic() + delay, None, False))


async def deliver(queue, writer, other):
    while True:
        due, data, more = await queue.get()
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if data is None:
            writer.transport.abort()  # pass the reset on
            other.transport.abort()
            return
        if not more:
            writer.close()
            return
        writer.write(data)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            other.transport.abort()
            return


async def main():
    listen, target, delay = split(sys.argv[1]), split(sys.argv[2]), int(sys.argv[3]) / 1000

    async def serve(c_reader, c_writer):
        up_q, down_q = asyncio.Queue(), asyncio.Queue()
        feeding = asyncio.ensure_future(carry(c_reader, up_q, delay))
        await asyncio.sleep(3 * delay)
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.transport.abort()
            feeding.cancel()
            return
        await asyncio.gather(
            feeding,
            deliver(up_q, t_writer, c_writer),
            carry(t_reader, down_q, delay),
            deliver(down_q, c_writer, t_writer),
            return_exceptions=True,
        )

    server = await asyncio.start_server(serve, *listen)
    async with server:
        await server.serve_forever()


asyncio.run(main())
