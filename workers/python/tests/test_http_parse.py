"""drover_wsgi's request parser and target splitting, without sockets."""

import unittest

from drover_wsgi import HTTPError, MAX_HEAD, parse_request, split_target


def parse(raw):
    return parse_request(raw)


class ParseTest(unittest.TestCase):
    def assertStatus(self, raw, status):
        with self.assertRaises(HTTPError) as cm:
            parse(raw)
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

    def test_leading_empty_lines_and_bare_lf(self):
        req, used = parse(b"\r\n\r\nGET / HTTP/1.1\nHost: x\n\n")
        self.assertEqual(req.headers["HTTP_HOST"], "x")
        self.assertEqual(used, len(b"\r\n\r\nGET / HTTP/1.1\nHost: x\n\n"))

    def test_content_type_and_length_have_no_http_prefix(self):
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n")
        self.assertEqual(req.headers["CONTENT_TYPE"], "text/plain")
        self.assertEqual(req.headers["CONTENT_LENGTH"], "12")
        self.assertEqual(req.content_length, 12)

    def test_repeated_headers_are_joined(self):
        req, _ = parse(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\nCookie: c=1\r\nCookie: d=2\r\n\r\n")
        self.assertEqual(req.headers["HTTP_ACCEPT"], "a, b")
        self.assertEqual(req.headers["HTTP_COOKIE"], "c=1; d=2")

    def test_headers_with_underscores_are_dropped(self):
        req, _ = parse(b"GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: evil\r\nX-Forwarded-For: good\r\n\r\n")
        self.assertEqual(req.headers["HTTP_X_FORWARDED_FOR"], "good")

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
        self.assertStatus(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505)
        self.assertStatus(b"GET / FTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\n\r\n", 400)  # no Host
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400)  # space before the colon
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400)  # obs-fold
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400)
        self.assertStatus(b"GET / HTTP/1.1\nHost: x\r\nX: a\nb\r\n\r\n", 400)

    def test_content_length_smuggling_is_refused(self):
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400)
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(req.content_length, 5)

    def test_transfer_encodings(self):
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400)
        self.assertStatus(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400)

    def test_expect(self):
        req, _ = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\n")
        self.assertTrue(req.expect_continue)
        self.assertStatus(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n", 417)

    def test_head_size_limit(self):
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431)
        self.assertStatus(b"GET /" + b"a" * (MAX_HEAD + 10), 431)
        self.assertIsNone(parse(b"GET /" + b"a" * (MAX_HEAD - 100)))

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
