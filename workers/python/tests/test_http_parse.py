"""drover_wsgi's request parser and target splitting, without sockets."""

import unittest

from drover_wsgi.http import HTTPError, Limits, parse_chunk_size, parse_request, split_target


def parse(raw, limits=None):
    return parse_request(raw) if limits is None else parse_request(raw, limits)


class ParseTest(unittest.TestCase):
    def assertStatus(self, raw, status, limits=None):
        with self.assertRaises(HTTPError) as cm:
            parse(raw, limits)
        self.assertEqual(cm.exception.status, status, cm.exception.reason)

    def test_a_simple_request(self):
        req, used = parse(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Thing:  v  \r\n\r\nrest")
        self.assertEqual(used, len(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Thing:  v  \r\n\r\n"))
        self.assertEqual(req.method, "GET")
        self.assertEqual(req.target, b"/a?b=c")
        self.assertFalse(req.http10)
        self.assertTrue(req.keep_alive)
        self.assertEqual(req.headers, {"HTTP_HOST": "x", "HTTP_X_THING": "v"})
        self.assertEqual(req.content_length, 0)

    def test_incomplete_heads(self):
        self.assertIsNone(parse(b""))
        self.assertIsNone(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"))
        self.assertIsNone(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r"))

    def test_leading_empty_lines(self):
        req, used = parse(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(req.headers["HTTP_HOST"], "x")
        self.assertEqual(used, len(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"))

    def test_bare_lf_is_refused_wherever_it_is(self):
        # As llhttp's strict mode (and drover-h1) do: a peer that takes a bare
        # LF for a line end and one that does not would read different heads.
        self.assertStatus(b"GET / HTTP/1.1\nHost: x\n\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n", 400)
        # As soon as it is in, without waiting for the head's end...
        self.assertStatus(b"GET / HTTP/1.1\nHost", 400)
        # ... but after the lines before it: the first line at fault decides.
        self.assertStatus(b"GET / HTTP/2.0\r\nHost: x\n", 505)
        self.assertStatus(b"GET / HTTP/1.1\r\nX: " + b"v" * 9000 + b"\n", 431)

    def test_a_tls_handshake_is_named(self):
        # A ClientHello's record header (22, 3, 1; TLS 1.2's and 1.3's), then
        # binary bytes that were refused for whatever came first: the answer
        # names the cause, as soon as its first three bytes are in.
        from drover_wsgi.http import TLS_ON_PLAIN_HTTP

        for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", b"\x16\x03\x03",
                    b"\x16\x03\x00\x00\x05", b"\r\n\x16\x03\x04"):
            with self.assertRaises(HTTPError) as cm:
                parse(raw)
            self.assertEqual((cm.exception.status, cm.exception.reason), (400, TLS_ON_PLAIN_HTTP), raw)
        self.assertIsNone(parse(b"\x16\x03"))  # maybe a TLS record; nothing to say yet
        self.assertNotEqual(self._reason(b"\x16\x03\x05 / HTTP/1.1\r\n\r\n"), TLS_ON_PLAIN_HTTP)
        self.assertNotEqual(self._reason(b"\x17\x03\x01 / HTTP/1.1\r\n\r\n"), TLS_ON_PLAIN_HTTP)

    def _reason(self, raw):
        with self.assertRaises(HTTPError) as cm:
            parse(raw)
        return cm.exception.reason

    def test_content_type_and_length_have_no_http_prefix(self):
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n")
        self.assertEqual(req.headers["CONTENT_TYPE"], "text/plain")
        self.assertEqual(req.headers["CONTENT_LENGTH"], "12")
        self.assertEqual(req.content_length, 12)

    def test_repeated_headers_are_joined(self):
        req, _ = parse(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\nCookie: c=1\r\nCookie: d=2\r\n\r\n")
        self.assertEqual(req.headers["HTTP_ACCEPT"], "a, b")
        self.assertEqual(req.headers["HTTP_COOKIE"], "c=1; d=2")

    def test_headers_with_underscores_are_kept_aside(self):
        req, _ = parse(b"GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: evil\r\nX-Forwarded-For: good\r\n\r\n")
        self.assertEqual(req.headers["HTTP_X_FORWARDED_FOR"], "good")
        self.assertEqual(req.underscored, {"X_FORWARDED_FOR": "evil"})

    def test_keep_alive_rules(self):
        def ka(raw):
            return parse(raw)[0].keep_alive
        self.assertTrue(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertFalse(ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        self.assertFalse(ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, Close\r\n\r\n"))
        self.assertFalse(ka(b"GET / HTTP/1.0\r\n\r\n"))
        self.assertTrue(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"))

    def test_malformed_requests(self):
        self.assertStatus(b"GET /\r\n\r\n", 400)  # HTTP/0.9
        self.assertStatus(b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400)  # not UTF-8
        self.assertEqual(parse("GET /café HTTP/1.1\r\nHost: x\r\n\r\n".encode())[0].target, "/café".encode())
        self.assertStatus(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505)
        self.assertStatus(b"GET / FTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\n\r\n", 400)  # no Host
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400)  # space before the colon
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400)  # obs-fold
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\r\n\r\n", 400)

    def test_content_length_smuggling_is_refused(self):
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n", 400)
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n")
        self.assertEqual(req.content_length, 2**64 - 1)
        # Past int()'s 4300 digits: a 400 (it was a ValueError), leading zeros taken.
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400)
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"5\r\n\r\n")
        self.assertEqual(req.content_length, 5)
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 000\r\n\r\n")
        self.assertEqual(req.content_length, 0)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400)
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(req.content_length, 5)

    def test_transfer_encodings(self):
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n")
        self.assertTrue(req.chunked)
        self.assertEqual(req.content_length, 0)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400)
        # Only SP and HTAB are whitespace around a coding (str.strip() took
        # a NO-BREAK SPACE for one, and "\xa0chunked" for chunked).
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xa0chunked\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400)

    def test_expect(self):
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\n")
        self.assertTrue(req.expect_continue)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n", 417)

    def test_gunicorns_limits_and_answers(self):
        # limit_request_line (4094): the request line without its CRLF; a 400.
        line = b"GET /" + b"a" * (4094 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 4094)
        self.assertIsNotNone(parse(line + b"\r\nHost: x\r\n\r\n"))
        self.assertStatus(line.replace(b"GET /", b"GET /a") + b"\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET /" + b"a" * 5000, 400)  # refused before the head ends
        self.assertIsNone(parse(line + b"\r"))  # its CR came alone: not over the limit
        # limit_request_fields (100): a 431.
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(99))
        self.assertIsNotNone(parse(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"))
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX-a: b\r\n" + fields + b"\r\n", 431)
        # limit_request_field_size (8190, with the CRLF): a 431.
        value = b"v" * (8190 - len(b"X: \r\n"))
        self.assertIsNotNone(parse(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + value + b"\r\n\r\n"))
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: v" + value + b"\r\n\r\n", 431)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: v" + value, 431)  # before its end
        # A head that cannot end within the limits is refused before its end.
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 200000, 431)
        # So are empty lines before the request line, past the size of a head.
        self.assertIsNone(parse(b"\r\n" * 400000))
        self.assertStatus(b"\r\n" * 500000, 431)

    def test_the_first_line_at_fault_decides(self):
        # Each line is checked in order, for its limits, then its line end,
        # then its syntax, so that a head fed in pieces gets the answer the
        # whole gets (and the native parser's, drover-h1).
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(200))
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nBad line\r\n" + fields + b"\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"Bad line\r\n\r\n", 431)
        self.assertStatus(b"G(T / HTTP/2.0\r\nHost: x\r\n\r\n", 505)
        self.assertStatus(b"G(T / HTTP/1.1\r\nX: " + b"v" * 9000 + b"\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nX: " + b"v" * 9000 + b"\r\nBad line\r\n\r\n", 431)
        # Incomplete: the limit of the last line is checked after the lines before it.
        self.assertStatus(b"GET / HTTP/1.1\r\nBad line\r\nX: " + b"v" * 9000, 400)
        self.assertIsNone(parse(b"GET / HTTP/1.1\r\nBad line\r\nX: v"))  # not checked till then

    def test_limits_are_settable_and_zero_means_gunicorns_maximum(self):
        small = Limits(request_line=20, request_fields=2, request_field_size=20)
        self.assertStatus(b"GET /aaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: x\r\n\r\n", 400, small)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\nC: d\r\n\r\n", 431, small)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxx\r\n\r\n", 431, small)
        unlimited = Limits(0, 0, 0)
        self.assertEqual((unlimited.request_line, unlimited.request_fields), (8190, 32768))
        self.assertIsNotNone(parse(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 100000 + b"\r\n\r\n", unlimited))
        with self.assertRaises(ValueError):
            Limits(-1)

    def test_chunk_size_lines(self):
        self.assertEqual(parse_chunk_size(b"1a"), 26)
        self.assertEqual(parse_chunk_size(b"0"), 0)
        self.assertEqual(parse_chunk_size(b"A;name=value"), 10)
        self.assertEqual(parse_chunk_size(b"ffffffffffffffff"), 2**64 - 1)
        self.assertEqual(parse_chunk_size(b"2 ; a = b ;c;d=\"x;\\\"y\""), 2)  # BWS, quoted-string
        # RFC 9112 7.1.1, as llhttp reads it: no empty extension ("2;"), no
        # padding around the size, no BWS at the end.
        for bad in (b"", b"x", b"-1", b"+1", b"0x10", b"1 2", b"1" * 17, b"2;", b"2; ", b"2;;a", b" 2", b"2 ",
                    b"2\t", b"2;a ", b"2;a=", b"2;=b", b"2;a=b c", b'2;a="b', b'2;a="b"c', b"2;a@"):
            with self.assertRaises(HTTPError):
                parse_chunk_size(bad)

    def test_split_target(self):
        self.assertEqual(split_target(b"/a%20b/c%2Fd?x=%20&y"), ("/a b/c/d", "x=%20&y"))
        self.assertEqual(split_target(b"/caf%C3%A9"), ("/caf\xc3\xa9", ""))  # PEP 3333: bytes as latin-1
        self.assertEqual(split_target(b"http://example.com/p?q"), ("/p", "q"))
        self.assertEqual(split_target(b"http://example.com"), ("/", ""))
        self.assertEqual(split_target(b"*"), ("*", ""))
        with self.assertRaises(HTTPError):
            split_target(b"example.com:443")


if __name__ == "__main__":
    unittest.main()
