"""Verifies a JWT as an independent service would: PyJWT, the keys fetched from a JWKS URL.

Reads {"jwt", "jwks_url", "audience", "issuer"} as JSON on stdin; prints {"claims", "header",
"thumbprint"} when the JWT verifies (the thumbprint, RFC 7638, of the key that verified it,
computed here from the JWKS), else {"error": <PyJWT's exception class>, "message"}.
Needs PyJWT with its crypto extra (pip install 'pyjwt[crypto]').
"""
import base64
import hashlib
import json
import sys
import urllib.request

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
        options={"require": ["exp", "iat", "sub", "aud", "iss", "jti", "sid", "sid_created_us"]},
    )
    header = jwt.get_unverified_header(token)
    with urllib.request.urlopen(request["jwks_url"]) as response:
        published = json.load(response)["keys"]
    jwk = next(k for k in published if k["kid"] == header["kid"])
    required = {"OKP": ["crv", "kty", "x"], "EC": ["crv", "kty", "x", "y"]}[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    thumbprint = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    print(json.dumps({"claims": claims, "header": header, "thumbprint": thumbprint}))
except jwt.PyJWTError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
