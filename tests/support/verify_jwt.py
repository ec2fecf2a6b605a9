"""Verifies a JWT as an independent service would: PyJWT, the keys fetched from a JWKS URL.

Reads {"jwt", "jwks_url", "audience", "issuer"} as JSON on stdin; prints {"claims", "header"}
when the JWT verifies, else {"error": <PyJWT's exception class>, "message"}.
Needs PyJWT with its crypto extra (pip install 'pyjwt[crypto]').
"""
import json
import sys

import jwt

request = json.load(sys.stdin)
token = request["jwt"]
try:
    client = jwt.PyJWKClient(request["jwks_url"], cache_jwk_set=False, cache_keys=False)
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["EdDSA", "ES256"],
        audience=request["audience"],
        issuer=request["issuer"],
        options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
    )
    print(json.dumps({"claims": claims, "header": jwt.get_unverified_header(token)}))
except jwt.PyJWTError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
