#!/usr/bin/env python3
"""IMAP and POP3 clients for ops/interop/dovecot.sh, each from a chosen
loopback source address (so Dovecot's log can show that the real client
reached it through mailmoat's PROXY header).

Every command prints one line saying what happened and exits 0 when it is
what the script expects, 1 (with the reason) when not. Every socket has a
timeout: nothing here waits forever.
"""

import argparse
import concurrent.futures
import imaplib
import ipaddress
import poplib
import socket
import ssl
import struct
import sys

TIMEOUT = 20


class Imap(imaplib.IMAP4):
    def __init__(self, host, port, source):
        self._source = source
        super().__init__(host, port, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class ProxiedImap(Imap):
    """Sends a PROXY v2 header naming `claimed` before IMAP: Dovecot's
    haproxy listener checked on its own, without mailmoat."""

    def __init__(self, host, port, source, claimed):
        self._claimed = claimed
        super().__init__(host, port, source)

    def _create_socket(self, timeout):
        sock = super()._create_socket(timeout)
        src = ipaddress.IPv4Address(self._claimed).packed
        dst = ipaddress.IPv4Address(self.host).packed
        body = src + dst + struct.pack("!HH", 40000, self.port)
        header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
        sock.sendall(header)
        return sock


class Pop3(poplib.POP3):
    def __init__(self, host, port, source):
        self._source = source
        super().__init__(host, port, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def tls_context(args):
    # Verifies mailmoat's certificate: the CA, and 127.0.0.1 among its names.
    return ssl.create_default_context(cafile=args.ca)


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def read_mailbox(args):
    """Logs in (over STARTTLS with --ca), reads message 1's subject."""
    try:
        if args.claim:
            client = ProxiedImap(args.host, args.port, args.source, args.claim)
        else:
            client = Imap(args.host, args.port, args.source)
        if args.ca:
            client.starttls(ssl_context=tls_context(args))
        client.login(args.user, args.password)
        typ, data = client.select("INBOX", readonly=True)
        if typ != "OK" or data[0] != b"1":
            fail(f"SELECT INBOX: {typ} {data!r}, expected 1 message")
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        header = data[0][1] if typ == "OK" and data and isinstance(data[0], tuple) else b""
        client.logout()
    except (OSError, imaplib.IMAP4.error, ssl.SSLError) as e:
        fail(f"IMAP from {args.source}: {e!r}")
    if args.subject.encode() not in header:
        fail(f"message 1's subject is {header!r}, expected {args.subject!r}")
    how = " inside STARTTLS" if args.ca else ""
    if args.claim:
        how += f" with a PROXY v2 header naming {args.claim}"
    print(f"IMAP login from {args.source}{how} read message 1: {header.decode().strip()}")


def retr(args):
    try:
        client = Pop3(args.host, args.port, args.source)
        if args.ca:
            client.stls(context=tls_context(args))
        client.user(args.user)
        client.pass_(args.password)
        count, _size = client.stat()
        if count != 1:
            fail(f"STAT: {count} messages, expected 1")
        _resp, lines, _octets = client.retr(1)
        client.quit()
    except (OSError, poplib.error_proto, ssl.SSLError) as e:
        fail(f"POP3 from {args.source}: {e!r}")
    subject = f"Subject: {args.subject}".encode()
    if subject not in lines:
        fail(f"RETR 1 has no {subject!r}: {lines!r}")
    print(f"POP3 login from {args.source} RETR 1: {subject.decode()}")


def one_wrong_login(args, n):
    """One connection, one wrong password: 'failed' when the receiver's
    NO [AUTHENTICATIONFAILED] came back, 'refused' when mailmoat closed or
    refused the connection, else what happened."""
    try:
        client = Imap(args.host, args.port, args.source)
    except OSError as e:
        return f"refused ({e.__class__.__name__})"
    except imaplib.IMAP4.abort as e:
        return f"refused ({e})"
    try:
        if args.ca:
            client.starttls(ssl_context=tls_context(args))
        client.login(args.user, f"wrong-{n}")
        return "logged in"
    except imaplib.IMAP4.abort as e:
        return f"refused ({e})"
    except imaplib.IMAP4.error as e:
        text = str(e)
        return "failed" if "AUTHENTICATIONFAILED" in text else f"other ({text})"
    except OSError as e:
        return f"refused ({e.__class__.__name__})"
    finally:
        try:
            client.shutdown()
        except OSError:
            pass


def brute(args):
    """`count` wrong passwords at once, each on its own connection: the
    parallel attempts Dovecot's per-IP auth_penalty lets through."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.count) as pool:
        results = list(pool.map(lambda n: one_wrong_login(args, n), range(args.count)))
    tally = {}
    for r in results:
        tally[r] = tally.get(r, 0) + 1
    print(f"brute force from {args.source}: " + ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))
    if "logged in" in tally:
        fail("a wrong password logged in")
    if tally.get("failed", 0) == 0:
        fail("no wrong password reached the receiver (no NO [AUTHENTICATIONFAILED])")


def refused(args):
    """A new connection is refused: closed or reset before or at the
    greeting, or a greeting that is IMAP's * BYE or POP3's -ERR."""
    try:
        sock = socket.create_connection(
            (args.host, args.port), TIMEOUT, source_address=(args.source, 0)
        )
    except OSError as e:
        print(f"connection from {args.source} refused: {e!r}")
        return
    try:
        greeting = sock.recv(512)
    except OSError as e:
        print(f"connection from {args.source} cut: {e!r}")
        return
    finally:
        sock.close()
    if greeting == b"" or greeting.startswith((b"* BYE", b"-ERR")):
        print(f"connection from {args.source} refused: {greeting!r}")
        return
    # Not a failure by itself: the script polls this until its deadline
    # (a ban reaches the door a moment after it is listed), and says FAIL
    # only when that runs out.
    print(f"connection from {args.source} greeted {greeting!r}, not refused yet")
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["imap", "pop3", "brute", "refused"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", required=True, help="loopback address to connect from")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--password", default="")
    parser.add_argument("--ca", help="STARTTLS/STLS, verifying against this CA")
    parser.add_argument("--claim", help="IMAP: send a PROXY v2 header naming this client")
    parser.add_argument("--subject", default="")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    {"imap": read_mailbox, "pop3": retr, "brute": brute, "refused": refused}[args.command](args)


if __name__ == "__main__":
    main()
