# A WSGI filter for Swift's proxy (paste name t2i_anon_deny), placed before s3api.
#
# Swift hands requests without S3 credentials to its own API, which answers an S3-style path
# with 400 "Bad Request". AWS S3 (and MinIO) answer 403 AccessDenied for a private object, and
# that is what the app and its tests should see, so this filter refuses anonymous S3-style
# requests the way S3 does. Swift's own paths (/v1, /auth, /info, /healthcheck) and any request
# that carries credentials pass through untouched.
#
# src/dev/services/swift.ts copies this file into the services folder and puts that folder on
# the proxy's PYTHONPATH.
import uuid

SWIFT_PREFIXES = ('/v1/', '/auth/', '/info', '/healthcheck', '/crossdomain.xml')
S3_QUERY_AUTH = ('X-Amz-Signature=', 'X-Amz-Credential=', 'AWSAccessKeyId=', 'Signature=')


def filter_factory(global_conf, **local_conf):
    def deny_anonymous(app):
        def middleware(env, start_response):
            path = env.get('PATH_INFO', '')
            query = env.get('QUERY_STRING', '')
            has_auth = ('HTTP_AUTHORIZATION' in env or 'HTTP_X_AUTH_TOKEN' in env
                        or any(k in query for k in S3_QUERY_AUTH))
            if has_auth or path.startswith(SWIFT_PREFIXES):
                return app(env, start_response)
            body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                    '<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
                    '<RequestId>%s</RequestId></Error>' % uuid.uuid4().hex).encode()
            start_response('403 Forbidden', [('Content-Type', 'application/xml'),
                                             ('Content-Length', str(len(body)))])
            return [body]
        return middleware
    return deny_anonymous
