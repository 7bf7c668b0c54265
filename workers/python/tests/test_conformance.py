"""HTTP/1.1 conformance of drover_wsgi, end to end over a socket.

The cases are adapted from the request fixtures of llhttp's test suite
(nodejs/llhttp, test/request/*.md: pipelining, connection, content-length,
transfer-encoding, invalid) and from RFC 9110/9112, which those fixtures
cite: the facts (what a request is, and whether it must be refused) carry
over; the test code is ours. Where llhttp refuses a message, so do we, with
a 4xx and the connection closed, so that nothing after it can be smuggled in
as a second request.
"""

import json
import signal
import socket
import unittest

from tests.helpers import Client, Worker


def post_chunked(body, path="/environ", extra=b""):
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" + extra
            + b"\r\n" + body)


class ConformanceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.w = Worker("apps:app", args=["--threads", "2"])

    @classmethod
    def tearDownClass(cls):
        cls.w.signal(signal.SIGTERM)
        code, err = cls.w.wait()
        cls.w.close()
        assert code == 0, err

    def exchange(self, raw, responses=1):
        """Sends ``raw``, reads ``responses`` responses; returns them and
        whether the server then closed the connection (EOF within 3 s)."""
        with Client(self.w) as c:
            c.send(raw)
            got = [c.response() for _ in range(responses)]
            return got, c.eof_within(3)

    def refused(self, raw, status=400):
        (resp,), closed = self.exchange(raw)
        self.assertEqual(resp[0], status, (raw, resp))
        self.assertEqual(resp[1].get("connection"), "close", raw)
        self.assertTrue(closed, "closed after %r" % raw)

    # -- pipelining and Connection ------------------------------------------

    def test_pipelined_requests_are_answered_in_order(self):
        raw = (b"GET /environ/1 HTTP/1.1\r\nHost: t\r\n\r\n"
               b"POST /environ/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
               b"POST /environ/3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
               b"GET /environ/4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got, closed = self.exchange(raw, 4)
        bodies = [json.loads(r[2]) for r in got]
        self.assertEqual([b["PATH_INFO"] for b in bodies], ["/environ/1", "/environ/2", "/environ/3", "/environ/4"])
        self.assertEqual([b["body"] for b in bodies], ["", "hello", "abc", ""])
        self.assertEqual([r[1].get("connection") for r in got], [None, None, None, "close"])
        self.assertTrue(closed)

    def test_connection_header(self):
        # HTTP/1.1 persists by default; "close" (any case, in a list) ends it.
        for value in (b"close", b"Close", b"keep-alive, close", b"Upgrade, CLOSE"):
            (resp,), closed = self.exchange(b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: " + value + b"\r\n\r\n")
            self.assertEqual((resp[1].get("connection"), closed), ("close", True), value)
        # HTTP/1.0 closes unless the client asks to keep it.
        (resp,), closed = self.exchange(b"GET /pid HTTP/1.0\r\n\r\n")
        self.assertEqual((resp[1].get("connection"), closed), ("close", True))
        got, closed = self.exchange(b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                    b"GET /pid HTTP/1.0\r\n\r\n", 2)
        self.assertEqual([r[1].get("connection") for r in got], ["keep-alive", "close"])
        self.assertTrue(closed)

    def test_head_has_no_body_but_the_length_of_get(self):
        with Client(self.w) as c:
            c.send(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            _, get_headers, body = c.response()
            c.send(b"HEAD /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = c.response(head_only=True)
            self.assertEqual((status, headers.get("content-length")), (200, str(len(body))))
            # The next response follows at once: no body was sent for HEAD.
            c.send(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            self.assertEqual(c.response()[2], body)

    # -- framing: Content-Length and Transfer-Encoding --------------------------

    def test_content_length_and_transfer_encoding_together_are_refused(self):
        # The classic smuggling pair (RFC 9112 section 6.1; llhttp: "Content-Length
        # can't be present with Transfer-Encoding"): a 400, then the connection
        # is closed, so the "second request" in the body is never served.
        smuggled = b"GET /environ/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
        for te in (b"chunked", b"identity", b"", b"gzip, chunked"):
            self.refused(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: " + te
                         + b"\r\n\r\n0\r\n\r\n" + smuggled)
            self.refused(b"POST /environ HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + te
                         + b"\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled)

    def test_transfer_encodings_that_do_not_end_in_chunked_are_refused(self):
        # llhttp: "Request has invalid Transfer-Encoding" (pigeons, an empty one).
        for te in (b"pigeons", b"", b"chunked, gzip", b"chunked, chunked"):
            self.refused(post_chunked(b"0\r\n\r\n").replace(b"chunked\r\n", te + b"\r\n", 1))
        # A known coding before chunked is understood but not supported.
        self.refused(post_chunked(b"0\r\n\r\n").replace(b"chunked\r\n", b"gzip, chunked\r\n", 1), 501)

    def test_bad_content_lengths_are_refused(self):
        for cl in (b"-1", b"+5", b"5 5", b"0x5", b"5,5", b"", b"abc"):
            self.refused(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: " + cl + b"\r\n\r\nhello")
        self.refused(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nhello")

    def test_chunked_bodies_as_llhttp_reads_them(self):
        cases = [
            (b"a\r\n0123456789\r\n0\r\n\r\n", "0123456789"),  # lowercase size
            (b"A\r\n0123456789\r\n0\r\n\r\n", "0123456789"),  # uppercase size
            (b"5\r\nhello\r\n6\r\n world\r\n000\r\n\r\n", "hello world"),  # zero-prefixed last chunk
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\nVary: *\r\nContent-Type: text/plain\r\n\r\n", "hello world"),
            (b'5;ilovew3="I \\"love\\"; \\\\extensions\\\\";somuchlove="x";blah;foo=bar\r\nhello\r\n'
             b"6;blahblah;blah\r\n world\r\n0\r\n\r\n", "hello world"),  # extensions, quoted
        ]
        for body, expected in cases:
            (resp,), _ = self.exchange(post_chunked(body, extra=b"Connection: close\r\n"))
            self.assertEqual((resp[0], json.loads(resp[2])["body"]), (200, expected), body)

    def test_malformed_chunks_are_refused(self):
        for body in (
            b"2 erfrferferf\r\naa\r\n0 rrrr\r\n\r\n",  # no semicolon before an extension
            b"g\r\nhello\r\n0\r\n\r\n",  # not hexadecimal
            b"5\r\nhello world\r\n0\r\n\r\n",  # more data than the size
            b"ffffffffffffffffff\r\n",  # an absurd size
            b"2;\r\naa\r\n0\r\n\r\n",  # an empty extension
            b"2 \r\naa\r\n0\r\n\r\n",  # whitespace after the size
            b" 2\r\naa\r\n0\r\n\r\n",  # whitespace before it
        ):
            self.refused(post_chunked(body))

    def test_chunk_lines_and_trailers_are_read_as_drover_h1_reads_them(self):
        # Both cores answer a chunked body the same (docs/http-parser.md): a
        # bare LF or a lone CR ends no chunk line, a trailer is a field line
        # as in the head, and a line past 4096 bytes (without its CRLF) is
        # refused even when its end came with it.
        long_ext = b";" + b"x" * 4094  # with the size "2": a 4096-byte line
        for body in (
            b"2\naa\r\n0\r\n\r\n",  # a bare LF after the size
            b"2;a=b\naa\r\n0\r\n\r\n",  # a bare LF after an extension
            b"2\r\naa\n0\r\n\r\n",  # a bare LF after the data
            b"2\r\naa\r\n0\n\r\n",  # a bare LF after the last chunk
            b"2\r\naa\r\n0\r\n\n",  # a bare LF as the final line end
            b"0\r\nX-A: b\n\r\n",  # a bare LF after a trailer
            b"0\r\nX-A: b\rc\r\n\r\n",  # a CR in a trailer value
            b"0\r\nX-A: a\x00b\r\n\r\n",  # NUL in a trailer value
            b"0\r\nX-A b\r\n\r\n",  # a trailer without a colon
            b"0\r\nX-A : b\r\n\r\n",  # whitespace before a trailer's colon
            b"0\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold in the trailer section
            b"0\r\n: b\r\n\r\n",  # a trailer without a name
            b"2" + long_ext + b"x\r\naa\r\n0\r\n\r\n",  # a 4097-byte chunk-size line
            b"0\r\nX-A: " + b"b" * 4092 + b"\r\n\r\n",  # a 4097-byte trailer line
        ):
            with self.subTest(body=body[:48]):
                self.refused(post_chunked(body))

    def test_chunk_lines_and_trailers_at_their_limits_are_taken(self):
        # The other side of the limits above, on both cores: a 4096-byte
        # line, 100 trailers, obs-text and HTAB in a trailer value.
        long_ext = b";" + b"x" * 4094
        for body in (
            b"2" + long_ext + b"\r\naa\r\n0\r\n\r\n",
            b"2\r\naa\r\n0\r\nX-A: " + b"b" * 4091 + b"\r\n\r\n",
            b"2\r\naa\r\n0\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
            b"2\r\naa\r\n0\r\nX-A: caf\xe9\t\r\n\r\n",
        ):
            (resp,), _ = self.exchange(post_chunked(body, extra=b"Connection: close\r\n"))
            self.assertEqual((resp[0], json.loads(resp[2])["body"]), (200, "aa"), body[:48])

    # -- request line and fields -----------------------------------------------

    def test_malformed_heads_are_refused(self):
        for raw in (
            b"GET / http/1.1\r\nHost: t\r\n\r\n",  # the version is case-sensitive
            b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",  # whitespace before the colon
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",  # obsolete line folding
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A\r\n\r\n",  # no colon
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",  # NUL in a value
            b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts
            b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",  # space in the target
            b"G@T / HTTP/1.1\r\nHost: t\r\n\r\n",  # not a token
            b"GET /caf\xe9 HTTP/1.1\r\nHost: t\r\n\r\n",  # a target that is not UTF-8
            b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",  # CR in a value
            # Bare LF line ends (llhttp's strict mode refuses them), and
            # before the head ends: a client that sends only LFs is answered.
            b"GET /pid HTTP/1.1\nHost: t\n\n",
            b"GET /pid HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
            b"GET /pid HTTP/1.1\r\nHost: t\r\n\n",
            b"GET /pid HTTP/1.1\nHost: t\n",
        ):
            self.refused(raw)
        self.refused(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505)

    def test_target_forms(self):
        (resp,), _ = self.exchange(b"GET http://example.org/environ/x?q=1 HTTP/1.1\r\nHost: example.org\r\n"
                                   b"Connection: close\r\n\r\n")
        env = json.loads(resp[2])
        self.assertEqual((env["PATH_INFO"], env["QUERY_STRING"]), ("/environ/x", "q=1"))
        (resp,), _ = self.exchange(b"GET /environ/%7Euser?a=%20 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        env = json.loads(resp[2])
        self.assertEqual((env["PATH_INFO"], env["QUERY_STRING"], env["RAW_URI"]),
                         ("/environ/~user", "a=%20", "/environ/%7Euser?a=%20"))

    def test_an_http10_request_with_transfer_encoding_is_refused(self):
        # RFC 9112 section 6.1: a server may treat it as faulty; we do.
        self.refused(b"POST /environ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

    def test_leading_empty_lines_are_skipped(self):
        # RFC 9112 section 2.2: at least one empty line before the request line is ignored.
        (resp,), _ = self.exchange(b"\r\n\r\nGET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        self.assertEqual(resp[0], 200)

    def test_a_client_that_half_closes_still_gets_its_answer(self):
        with Client(self.w) as c:
            c.send(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            c.sock.shutdown(socket.SHUT_WR)
            self.assertEqual(c.response()[0], 200)
            self.assertTrue(c.eof_within(3))


if __name__ == "__main__":
    unittest.main()
