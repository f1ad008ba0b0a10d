"""Drives the broker's Key Vault REST API with the unmodified Azure SDK for Python.

Run by tests/rest_sdk_python.rs:  python keyvault.py '<steps as JSON>'

Every input comes from the environment, as it would for an application:
  VAULT_URL                    https://<vault>.vault.localhost:<port>
  REQUESTS_CA_BUNDLE           the broker's dev CA (the SDK's documented way to trust a CA)
  SDK_CREDENTIAL               "appservice" | "imds" | "secret": which credential to build
  MI_CLIENT_ID | MI_OBJECT_ID | MI_RESOURCE_ID   the user-assigned identity a managed-identity
                               credential asks for
  IDENTITY_ENDPOINT, IDENTITY_HEADER          App Service protocol (read by the SDK itself)
  AZURE_POD_IDENTITY_AUTHORITY_HOST           IMDS protocol (read by the SDK itself)
  AZURE_AUTHORITY_HOST, AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET   service principal

Each step is {"op": NAME, ...arguments}; the script prints one JSON list with, per step, either
{"ok": RESULT} or {"error": {"type", "status", "code", "inner", "message"}}, and every HTTP
response the SDK received during that step ({"responses": [[status, retry-after], ...]}), so a
test sees the SDK's retries.
"""

import base64
import json
import os
import sys
from datetime import datetime, timezone

from azure.core.exceptions import HttpResponseError
from azure.identity import ClientSecretCredential, ManagedIdentityCredential
from azure.keyvault.keys import (
    KeyClient,
    KeyCurveName,
    KeyRotationLifetimeAction,
    KeyRotationPolicy,
    KeyRotationPolicyAction,
)
from azure.keyvault.keys.crypto import (
    CryptographyClient,
    EncryptionAlgorithm,
    KeyWrapAlgorithm,
    SignatureAlgorithm,
)


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text)


def credential():
    kind = os.environ["SDK_CREDENTIAL"]
    if kind in ("appservice", "imds"):
        # Which protocol the credential speaks is decided by the environment alone; the identity
        # is named by client id, or through identity_config by object id or resource id.
        if "MI_OBJECT_ID" in os.environ:
            return ManagedIdentityCredential(identity_config={"object_id": os.environ["MI_OBJECT_ID"]})
        if "MI_RESOURCE_ID" in os.environ:
            return ManagedIdentityCredential(identity_config={"resource_id": os.environ["MI_RESOURCE_ID"]})
        return ManagedIdentityCredential(client_id=os.environ["MI_CLIENT_ID"])
    if kind == "secret":
        # The authority host comes from AZURE_AUTHORITY_HOST; a local authority is not one of the
        # cloud's, so instance discovery (a call to login.microsoftonline.com) is turned off.
        return ClientSecretCredential(
            os.environ["AZURE_TENANT_ID"],
            os.environ["AZURE_CLIENT_ID"],
            os.environ["AZURE_CLIENT_SECRET"],
            disable_instance_discovery=True,
        )
    raise SystemExit(f"unknown SDK_CREDENTIAL {kind!r}")


RESPONSES = []


def record(response):
    """raw_response_hook: every response the pipeline received (after each retry)."""
    http = response.http_response
    RESPONSES.append([http.status_code, http.headers.get("Retry-After")])


CRED = credential()
KEYS = KeyClient(os.environ["VAULT_URL"], CRED, raw_response_hook=record)


def crypto(kid):
    return CryptographyClient(kid, CRED, raw_response_hook=record)


def props(p):
    return {
        "id": p.id,
        "name": p.name,
        "version": p.version,
        "enabled": p.enabled,
        "tags": p.tags or {},
        "expires_on": int(p.expires_on.timestamp()) if p.expires_on else None,
        "not_before": int(p.not_before.timestamp()) if p.not_before else None,
        "recovery_level": p.recovery_level,
    }


def key(k):
    out = props(k.properties)
    out["kty"] = str(k.key_type.value if hasattr(k.key_type, "value") else k.key_type)
    out["key_ops"] = list(k.key_operations or [])
    if k.key.n:
        out["n_bits"] = len(k.key.n) * 8
    if k.key.crv:
        out["crv"] = str(k.key.crv.value if hasattr(k.key.crv, "value") else k.key.crv)
    return out


# Steps ----------------------------------------------------------------------------------------


def op_create_rsa(s):
    return key(KEYS.create_rsa_key(s["name"], size=s.get("size", 2048)))


def op_create_ec(s):
    return key(KEYS.create_ec_key(s["name"], curve=KeyCurveName(s.get("curve", "P-256"))))


def op_get(s):
    return key(KEYS.get_key(s["name"], s.get("version")))


def op_list(s):
    """Lists the vault's keys page by page, `max_page_size` at a time."""
    pages = KEYS.list_properties_of_keys(max_page_size=s.get("max_page_size")).by_page()
    sizes, names = [], []
    for page in pages:
        items = list(page)
        sizes.append(len(items))
        names.extend(p.name for p in items)
    return {"page_sizes": sizes, "names": names}


def op_versions(s):
    return sorted(p.version for p in KEYS.list_properties_of_key_versions(s["name"]))


def op_update(s):
    """Updates enabled, tags and (Unix seconds) not_before / expires_on; absent = unchanged."""
    when = {k: datetime.fromtimestamp(s[k], timezone.utc) for k in ("not_before", "expires_on") if s.get(k) is not None}
    return key(KEYS.update_key_properties(s["name"], enabled=s.get("enabled"), tags=s.get("tags"), **when))


def op_delete(s):
    deleted = KEYS.begin_delete_key(s["name"]).result()
    return {
        "name": deleted.name,
        "recovery_id": deleted.recovery_id,
        "deleted_on": bool(deleted.deleted_date),
        "scheduled_purge": bool(deleted.scheduled_purge_date),
    }


def op_deleted_names(s):
    return sorted(d.name for d in KEYS.list_deleted_keys())


def op_recover(s):
    return key(KEYS.begin_recover_deleted_key(s["name"]).result())


def op_purge(s):
    KEYS.purge_deleted_key(s["name"])
    return True


def op_backup(s):
    return b64(KEYS.backup_key(s["name"]))


def op_restore(s):
    return key(KEYS.restore_key_backup(unb64(s["backup"])))


def op_rotate(s):
    return key(KEYS.rotate_key(s["name"]))


def op_set_rotation_policy(s):
    policy = KeyRotationPolicy(
        expires_in=s["expires_in"],
        lifetime_actions=[
            KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_before_expiry=s["rotate_before_expiry"])
        ],
    )
    return rotation_policy(KEYS.update_key_rotation_policy(s["name"], policy))


def op_get_rotation_policy(s):
    return rotation_policy(KEYS.get_key_rotation_policy(s["name"]))


def rotation_policy(p):
    return {
        "expires_in": p.expires_in,
        "actions": [
            {
                "action": str(a.action.value if hasattr(a.action, "value") else a.action).lower(),
                "time_before_expiry": a.time_before_expiry,
                "time_after_create": a.time_after_create,
            }
            for a in p.lifetime_actions
        ],
    }


def op_wrap(s):
    r = crypto(s["kid"]).wrap_key(KeyWrapAlgorithm(s["alg"]), unb64(s["value"]))
    return {"kid": r.key_id, "value": b64(r.encrypted_key)}


def op_unwrap(s):
    r = crypto(s["kid"]).unwrap_key(KeyWrapAlgorithm(s["alg"]), unb64(s["value"]))
    return {"kid": r.key_id, "value": b64(r.key)}


def op_encrypt(s):
    r = crypto(s["kid"]).encrypt(EncryptionAlgorithm(s["alg"]), unb64(s["value"]))
    return {"kid": r.key_id, "value": b64(r.ciphertext)}


def op_decrypt(s):
    r = crypto(s["kid"]).decrypt(EncryptionAlgorithm(s["alg"]), unb64(s["value"]))
    return {"kid": r.key_id, "value": b64(r.plaintext)}


def op_sign(s):
    r = crypto(s["kid"]).sign(SignatureAlgorithm(s["alg"]), unb64(s["digest"]))
    return {"kid": r.key_id, "signature": b64(r.signature)}


def op_verify(s):
    r = crypto(s["kid"]).verify(SignatureAlgorithm(s["alg"]), unb64(s["digest"]), unb64(s["signature"]))
    return r.is_valid


def run(step):
    global RESPONSES
    RESPONSES = []
    handler = globals().get("op_" + step["op"])
    if handler is None:
        raise SystemExit(f"unknown op {step['op']!r}")
    try:
        out = {"ok": handler(step)}
    except HttpResponseError as e:
        error = e.error
        out = {
            "error": {
                "type": type(e).__name__,
                "status": e.status_code,
                "code": error.code if error else None,
                "inner": (error.innererror or {}).get("code") if error else None,
                "message": error.message if error else str(e),
            }
        }
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        out = {"error": {"type": type(e).__name__, "status": None, "code": None, "inner": None, "message": str(e)}}
    out["responses"] = RESPONSES
    return out


def main():
    steps = json.loads(sys.argv[1])
    print(json.dumps([run(step) for step in steps]))


if __name__ == "__main__":
    main()
