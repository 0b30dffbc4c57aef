"""Issue 21, item 16: a configuration error names the setting and the problem, and never
shows what was given for a secret (token keys, Redis and store URLs, Serf keys)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from node.cli.main import main
from node.config import ConfigError, load_settings

SECRET = "Sup3rSecretValue"  # what must never appear

# (environment, the setting the message must name)
CASES: dict[str, tuple[dict[str, str], str]] = {
    "token-key-too-short": (
        {"SFUMESH_TOKEN_KEYS": f'{{"k": "{SECRET}"}}', "SFUMESH_TOKEN_SIGNING_KEY_ID": "k"},
        "32 bytes",
    ),
    "token-key-not-a-string": (
        {"SFUMESH_TOKEN_KEYS": f'{{"k": ["{SECRET}"]}}', "SFUMESH_TOKEN_SIGNING_KEY_ID": "k"},
        "tokens.keys.k",
    ),
    "token-keys-broken-json": ({"SFUMESH_TOKEN_KEYS": f'{{"k":"{SECRET}'}, "SFUMESH_TOKEN_KEYS"),
    "token-keys-a-list": ({"SFUMESH_TOKEN_KEYS": f'["{SECRET}"]'}, "tokens.keys"),
    "redis-url-a-list": ({"REDIS_URL": f'["redis://:{SECRET}@db:6379"]'}, "redis_url"),
    "mongodb-uri-an-object": ({"MONGODB_URI": f'{{"mongodb://u:{SECRET}@db": 1}}'}, "mongodb_uri"),
    "lock-urls-an-object": (
        {"SFUMESH_LOCK_REDIS_URLS": f'{{"redis://:{SECRET}@lock": 1}}'},
        "live.lock_redis_urls",
    ),
    "lock-url-a-number": (
        {"SFUMESH_LOCK_REDIS_URLS": f'["redis://:{SECRET}@lock", 7]'},
        "live.lock_redis_urls.1",
    ),
    "serf-rpc-auth-a-list": ({"SFUMESH_SERF_RPC_AUTH": f'["{SECRET}"]'}, "serf.rpc_auth"),
    "serf-encrypt-key-an-object": (
        {"SFUMESH_SERF_ENCRYPT_KEY": f'{{"{SECRET}": 1}}'},
        "serf.encrypt_key",
    ),
    "relay-key-a-list": ({"SFUMESH_RELAY_KEY": f'["{SECRET}"]'}, "relay.key"),
    "redis-password-a-list": ({"SFUMESH_REDIS_PASSWORD": f'["{SECRET}"]'}, "redis.password"),
    "sentinel-password-an-object": (
        {"SFUMESH_REDIS_SENTINEL_PASSWORD": f'{{"{SECRET}": 1}}'},
        "redis.sentinel_password",
    ),
    # Sentinel mode without sentinels says so, and not the password given beside.
    "sentinel-mode-without-sentinels": (
        {"SFUMESH_REDIS_MODE": "sentinel", "SFUMESH_REDIS_PASSWORD": SECRET},
        "redis.sentinels",
    ),
    # A mistake elsewhere still must not print the secrets given beside it.
    "bad-port-beside-secrets": (
        {
            "SFUMESH_PORT": "99999",
            "SFUMESH_TOKEN_KEYS": f'{{"k": "{SECRET * 3}"}}',
            "SFUMESH_TOKEN_SIGNING_KEY_ID": "k",
            "REDIS_URL": f"redis://:{SECRET}@db:6379",
            "SFUMESH_RELAY_KEY": SECRET,
        },
        "port",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_errors_never_show_a_secret(name: str) -> None:
    env, named = CASES[name]
    with pytest.raises(ConfigError) as raised:
        load_settings(env=env)
    message = str(raised.value)
    assert named in message, message
    assert SECRET not in message and SECRET[:6] not in message, message
    # Nor in a traceback of it, should one be logged (no ValidationError chained to it).
    printed = "".join(traceback.format_exception(raised.value))
    assert SECRET[:6] not in printed, printed


def test_secrets_in_a_config_file_are_not_shown(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[tokens]\nsigning_key_id = "k"\nkeys = {{ k = "{SECRET}" }}\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, env={})
    assert "32 bytes" in str(raised.value) and SECRET not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SFUMESH_TOKEN_KEYS": f'{{"k": "{SECRET}"}}'}, "tokens"),
        # checked when the node starts (the mesh needs it), not when settings load
        ({"SFUMESH_TOKEN_KEYS": f'{{"k": "{SECRET * 3}"}}', "SFUMESH_RELAY_KEY": SECRET}, "relay"),
    ],
)
def test_the_cli_prints_the_setting_not_the_secret(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    named: str,
) -> None:
    monkeypatch.setenv("SFUMESH_TOKEN_SIGNING_KEY_ID", "k")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["node", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "bad configuration" in err and named in err and SECRET[:6] not in err, err


def test_other_errors_still_say_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"serf\.mode: Input should be 'own', 'attach' or 'off'"):
        load_settings(env={"SFUMESH_SERF_MODE": "sometimes"})
    with pytest.raises(ConfigError, match="bcrypt_cost"):
        load_settings(env={"SFUMESH_BCRYPT_COST": "99"})


def test_redis_deployments_from_the_environment() -> None:
    settings = load_settings(
        env={
            "SFUMESH_REDIS_MODE": "sentinel",
            "SFUMESH_REDIS_SENTINELS": '["10.0.0.1:26379", "[fd00::2]:26379"]',
            "SFUMESH_REDIS_SENTINEL_SERVICE": "rooms",
            "SFUMESH_REDIS_PASSWORD": SECRET,
        }
    )
    redis = settings.redis
    assert redis.mode == "sentinel" and redis.sentinel_service == "rooms"
    assert redis.sentinel_addresses() == [("10.0.0.1", 26379), ("fd00::2", 26379)]
    assert redis.password.get_secret_value() == SECRET and SECRET not in repr(settings)
    assert load_settings(env={"SFUMESH_REDIS_MODE": "cluster"}).redis.mode == "cluster"
    for bad in ('["10.0.0.1"]', '["10.0.0.1:99999"]', '[":26379"]'):
        with pytest.raises(ConfigError, match=r"redis\.sentinels"):
            load_settings(env={"SFUMESH_REDIS_MODE": "sentinel", "SFUMESH_REDIS_SENTINELS": bad})
    with pytest.raises(ConfigError, match=r"redis\.mode"):
        load_settings(env={"SFUMESH_REDIS_MODE": "ring"})
