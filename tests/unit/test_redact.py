"""Redaction rules: secrets never survive, diagnostic values do."""

from __future__ import annotations

import pytest

from repro.redact import REDACTED, is_secret_name, redact_argv, redact_env, redact_text

HF = "hf_" + "A1b2C3d4E5f6G7h8I9j0KlMnOpQr"
SK = "sk-" + "proj-abcDEF123456ghiJKL789"
AKIA = "AKIA" + "ABCDEFGHIJKLMNOP"
GHP = "ghp_" + "a" * 36
SLACK = "xoxb-" + "123456789012-abcdefABCDEF"
JWT = "eyJhbGciOiJIUzI1NiJ9." + "eyJzdWIiOiIxMjM0NTY3ODkwIn0." + "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
HEX = "0123456789abcdef" * 3


@pytest.mark.parametrize(
    "name",
    [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "MY_API_KEY",
        "OPENAI_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "HF_HOME",
        "DB_PASSWORD",
        "LDAP_PASSWD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "PROXY_AUTH",
        "SSH_PRIVATE_KEY_FILE",
        "wandb_api_key",
        "Github_Token",
    ],
)
def test_secret_looking_variable_names_are_recognised(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "NCCL_DEBUG",
        "VLLM_USE_V1",
        "CUDA_VISIBLE_DEVICES",
        "PATH",
        "OMP_NUM_THREADS",
        "TORCH_NCCL_BLOCKING_WAIT",
    ],
)
def test_ordinary_variable_names_are_kept(name: str) -> None:
    assert not is_secret_name(name)


def test_redact_env_hides_secret_values_and_scrubs_the_others() -> None:
    env = {
        "HF_TOKEN": HF,
        "MY_API_KEY": "plainvalue",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NCCL_DEBUG": "INFO",
        "VLLM_EXTRA_ARGS": f"--tp 2 --token {SK}",
    }
    out = redact_env(env)
    assert out["HF_TOKEN"] == REDACTED
    assert out["MY_API_KEY"] == REDACTED
    assert out["AWS_DEFAULT_REGION"] == REDACTED
    assert out["NCCL_DEBUG"] == "INFO"
    assert out["VLLM_EXTRA_ARGS"] == f"--tp 2 --token {REDACTED}"
    assert env["HF_TOKEN"] == HF  # the input is not modified


@pytest.mark.parametrize(
    "text, secret",
    [
        (f"vllm serve llama --token {SK} --tp 2", SK),
        ("vllm serve llama --api-key=opensesame123 --tp 2", "opensesame123"),
        ("login --password hunter2hunter2", "hunter2hunter2"),
        ('run --password "correct horse battery"', "correct horse battery"),
        ("HF_TOKEN=whatever-it-is python x.py", "whatever-it-is"),
        ("MY_API_KEY=plain python x.py", "plain"),
        (f"export SECRET_KEY='{HEX}'", HEX),
        (f'{{"api_key": "{HEX}", "hidden": 4096}}', HEX),
        (f"client_secret: {HEX}", HEX),
        (f"loaded {HF} from cache", HF),
        (f"key {SK}", SK),
        (f"id {AKIA} used", AKIA),
        (f"remote https://x-access-token:{GHP}@github.com/o/r.git", GHP),
        ("git clone https://bob:pa55word@example.com/r.git", "pa55word"),
        (f"slack {SLACK}", SLACK),
        (f"jwt {JWT}", JWT),
        ("Authorization: Bearer abcdefghijklmnop1234", "abcdefghijklmnop1234"),
        ("curl -H 'Authorization: token zyxwvutsrq98765'", "zyxwvutsrq98765"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA\n-----END RSA PRIVATE KEY-----", "MIIEow"),
    ],
)
def test_secrets_in_free_text_do_not_survive(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize(
    "text",
    [
        "vllm serve meta-llama/Llama-3.1-70B-Instruct --tokenizer meta-llama/x --max-num-batched-tokens 8192",
        "token_num=16 hidden=8192 oneshot=True grid=(64,1,1)",
        "allreduce_fusion_kernel_oneshot_lamport<(flashinfer::trtllm_allreduce_fusion::AllReduceFusionPattern)1>",
        'Thread 3562 (active+gil): "MainThread"\n    spin_forever (spin.py:7)\n    0x7f29 (libc.so.6)',
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait',
        "commit 0123456789abcdef0123456789abcdef01234567",
        "disk-space-monitor-abcdefghijklmnopq",
    ],
)
def test_diagnostic_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_redact_argv_hides_flag_values_in_both_forms() -> None:
    argv = [
        "vdiag",
        "run",
        "seed.yaml",
        "--token",
        SK,
        "--hf-token=" + HF,
        "--use-auth-token",
        "--tp",
        "2",
        "MY_API_KEY=abc",
        "--tokenizer",
        "meta-llama/x",
    ]
    out = redact_argv(argv)
    assert out == [
        "vdiag",
        "run",
        "seed.yaml",
        "--token",
        REDACTED,
        "--hf-token=" + REDACTED,
        "--use-auth-token",
        "--tp",
        "2",
        "MY_API_KEY=" + REDACTED,
        "--tokenizer",
        "meta-llama/x",
    ]
    joined = " ".join(out)
    assert SK not in joined and HF not in joined and "abc" not in joined.split()


def test_redact_argv_catches_key_shaped_values_anywhere() -> None:
    out = redact_argv(["python", "-c", f"login('{HF}')", f"--note={SK}"])
    assert HF not in " ".join(out) and SK not in " ".join(out)


def test_redaction_is_idempotent() -> None:
    text = f"HF_TOKEN={HF} --token {SK} Authorization: Bearer abcdefghijklmnop"
    once = redact_text(text)
    assert redact_text(once) == once
