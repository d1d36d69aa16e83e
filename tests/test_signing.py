"""Standard Webhooks signatures (app.kit.signing): known answers, the openai SDK's verifier, and
every way a webhook can fail to verify."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import openai
import pytest

from app.kit.signing import SignatureError, headers, new_secret, secret_bytes, sign, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
# The example published by Standard Webhooks and Svix for the four values above.
PUBLISHED_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def event_body(job_id: str = "ftjob-abc123") -> bytes:
    return json.dumps(
        {
            "object": "event",
            "id": "evt_685343a1381c819085d44c354e1b330e",
            "type": "fine_tuning.job.succeeded",
            "created_at": 1750287018,
            "data": {"id": job_id},
        }
    ).encode()


def test_known_answer_matches_an_independent_hmac_and_the_published_example() -> None:
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, f"{MSG_ID}.{TIMESTAMP}.".encode() + BODY, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == expected == PUBLISHED_SIGNATURE
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    assert sent == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": PUBLISHED_SIGNATURE,
    }
    assert verify(SECRET, sent, BODY, now=TIMESTAMP + 10) == MSG_ID


def test_round_trip_with_a_new_secret() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret_bytes(secret)) == 32
    assert new_secret() != secret
    now = int(time.time())
    sent = headers([secret], "wh_1", now, event_body())
    assert verify(secret, sent, event_body()) == "wh_1"


def test_a_secret_without_prefix_is_used_as_raw_bytes() -> None:
    assert secret_bytes("plain-text-secret") == b"plain-text-secret"
    digest = hmac.new(b"plain-text-secret", b"id.5.{}", hashlib.sha256).digest()
    assert sign("plain-text-secret", "id", 5, b"{}") == "v1," + base64.b64encode(digest).decode()


def test_headers_verify_with_the_official_openai_sdk() -> None:
    secret = new_secret()
    body = event_body("ftjob-sdk")
    sent = headers([secret], "wh_685342e6c53c8190a1be43f081506c52", int(time.time()), body)
    sdk = openai.OpenAI(api_key="x", webhook_secret=secret)
    sdk.webhooks.verify_signature(body, sent)
    event = sdk.webhooks.unwrap(body, sent)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == "ftjob-sdk"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body + b" ", sent)
    # and the other way round: what the SDK accepts, so do we (raw-string secrets too)
    raw = headers(["not-base64-at-all"], "wh_2", int(time.time()), body)
    openai.OpenAI(api_key="x", webhook_secret="not-base64-at-all").webhooks.verify_signature(
        body, raw
    )
    assert verify("not-base64-at-all", raw, body) == "wh_2"


def test_wrong_secret_is_refused() -> None:
    sent = headers([new_secret()], MSG_ID, TIMESTAMP, BODY)
    with pytest.raises(SignatureError, match=r"no signature .* matches"):
        verify(new_secret(), sent, BODY, now=TIMESTAMP)


def test_tampered_body_id_or_timestamp_is_refused() -> None:
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    with pytest.raises(SignatureError, match="matches"):
        verify(SECRET, sent, BODY.replace(b"2432232314", b"2432232315"), now=TIMESTAMP)
    with pytest.raises(SignatureError, match="matches"):
        verify(SECRET, {**sent, "webhook-id": "msg_other"}, BODY, now=TIMESTAMP)
    with pytest.raises(SignatureError, match="matches"):
        verify(SECRET, {**sent, "webhook-timestamp": str(TIMESTAMP + 1)}, BODY, now=TIMESTAMP)


def test_timestamps_outside_the_tolerance_either_way_are_refused() -> None:
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    assert verify(SECRET, sent, BODY, now=TIMESTAMP + 300) == MSG_ID
    assert verify(SECRET, sent, BODY, now=TIMESTAMP - 300) == MSG_ID
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, sent, BODY, now=TIMESTAMP + 301)
    with pytest.raises(SignatureError, match="too new"):
        verify(SECRET, sent, BODY, now=TIMESTAMP - 301)
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, sent, BODY, now=TIMESTAMP + 61, tolerance_seconds=60)
    # the default `now` is the clock: a 2021 timestamp is long expired
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, sent, BODY)


@pytest.mark.parametrize("bad", ["", "  ", "12.5", "-5", "1e9", "1_614_265_330", "soon", "١٢٣"])
def test_a_timestamp_that_is_not_an_integer_is_refused(bad: str) -> None:
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY) | {"webhook-timestamp": bad}
    with pytest.raises(SignatureError, match="webhook-timestamp"):
        verify(SECRET, sent, BODY, now=TIMESTAMP)


def test_one_valid_signature_among_several_is_enough_for_rotation() -> None:
    old, new = new_secret(), new_secret()
    sent = headers([old, new], MSG_ID, TIMESTAMP, BODY)
    assert len(sent["webhook-signature"].split(" ")) == 2
    assert verify(old, sent, BODY, now=TIMESTAMP) == MSG_ID
    assert verify(new, sent, BODY, now=TIMESTAMP) == MSG_ID
    good = sign(SECRET, MSG_ID, TIMESTAMP, BODY)
    mixed = f"v1,bm90IGl0 v2,{good.removeprefix('v1,')} v1a,xyz {good}"
    assert verify(SECRET, {**sent, "webhook-signature": mixed}, BODY, now=TIMESTAMP) == MSG_ID


def test_signatures_of_other_versions_are_ignored() -> None:
    good = sign(SECRET, MSG_ID, TIMESTAMP, BODY).removeprefix("v1,")
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    for other in (f"v2,{good}", f"v1a,{good}", good):
        with pytest.raises(SignatureError, match="no 'v1,' signature"):
            verify(SECRET, {**sent, "webhook-signature": other}, BODY, now=TIMESTAMP)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_named(missing: str) -> None:
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    del sent[missing]
    with pytest.raises(SignatureError, match=f"missing header '{missing}'"):
        verify(SECRET, sent, BODY, now=TIMESTAMP)
    with pytest.raises(SignatureError, match=f"header '{missing}' is empty"):
        verify(SECRET, {**sent, missing: ""}, BODY, now=TIMESTAMP)


def test_header_names_match_whatever_their_case() -> None:
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    shouted = {name.upper(): value for name, value in sent.items()}
    titled = {name.title(): value for name, value in sent.items()}
    assert verify(SECRET, shouted, BODY, now=TIMESTAMP) == MSG_ID
    assert verify(SECRET, titled, BODY, now=TIMESTAMP) == MSG_ID


def test_a_malformed_secret_is_refused_without_repeating_it() -> None:
    for bad in ("whsec_not*base64!", "whsec_abc", "whsec_", ""):
        with pytest.raises(SignatureError) as refused:
            secret_bytes(bad)
        key = bad.removeprefix("whsec_")
        if key:  # the decoder's own error, which could quote the key, is not chained
            assert key not in str(refused.value) and refused.value.__suppress_context__
        else:
            assert "empty" in str(refused.value)
    sent = headers([SECRET], MSG_ID, TIMESTAMP, BODY)
    with pytest.raises(SignatureError, match="not valid base64"):
        verify("whsec_not*base64!", sent, BODY, now=TIMESTAMP)
    with pytest.raises(SignatureError, match="not valid base64"):
        sign("whsec_not*base64!", MSG_ID, TIMESTAMP, BODY)


def test_no_error_message_contains_the_secret() -> None:
    secret = new_secret()
    sent = headers([secret], MSG_ID, TIMESTAMP, BODY)
    attempts = [
        {**sent, "webhook-signature": "v1,AAAA"},
        {**sent, "webhook-timestamp": "x"},
        {k: v for k, v in sent.items() if k != "webhook-id"},
    ]
    for attempt in attempts:
        with pytest.raises(SignatureError) as refused:
            verify(secret, attempt, BODY, now=TIMESTAMP)
        key = secret.removeprefix("whsec_")
        assert key not in str(refused.value) and secret not in repr(refused.value)
    with pytest.raises(SignatureError) as old:
        verify(secret, sent, BODY, now=TIMESTAMP + 10_000)
    assert secret.removeprefix("whsec_") not in str(old.value)


def test_headers_needs_a_list_of_secrets() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        headers([], MSG_ID, TIMESTAMP, BODY)
    with pytest.raises(ValueError, match="non-empty"):
        headers(SECRET, MSG_ID, TIMESTAMP, BODY)
