"""A WSGI app that, as Flask and Django do, answers every exception of its
view with a 500 of its own. Its view reads the whole request body and
answers how many bytes it got."""


def app(environ, start_response):
    try:
        body = environ["wsgi.input"].read()
        status, out = "200 OK", b"%d bytes\n" % len(body)
    except Exception as e:  # what a framework does with a view's exception
        status, out = "500 Internal Server Error", b"the app caught %s\n" % type(e).__name__.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
