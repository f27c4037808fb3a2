import subprocess
import sys

from lillm.hf import export_hf
from lillm.tokenizer import load_tokenizer

from .conftest import REPO, run_cli, tiny_model


def test_help_lists_subcommands_with_text():
    """Every subcommand has its line in `lillm --help`; the training ones are the training scripts' own parsers
    (the same options and help as launch/pretrain.py), so `lillm pretrain --print_config` is its YAML."""
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("generate", "train-tokenizer", "prepare", "export", "checkpoint", "eval"):
        assert cmd in r.stdout
    assert "Pretrain a lillm model with DeepSpeed" in r.stdout and "Direct preference optimisation" in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0 and "Softmax temperature" in r.stdout and "--print_config" in r.stdout
    r = run_cli("pretrain", "--help")
    script = subprocess.run([sys.executable, "launch/pretrain.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--train.muon_lr" in r.stdout
    assert r.stdout.split("\n", 1)[1].split("options:")[1] == script.stdout.split("options:")[1]
    r = run_cli("sft", "--config", "sft-debug", "--train.lr", "1e-4", "--print_config")
    assert r.returncode == 0 and "init_from: runs/debug" in r.stdout and "lr: 0.0001" in r.stdout, r.stderr


def test_generate_from_exported_directory(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    export_hf(tiny_model(vocab_size=tok.vocab_size), tmp_path, tokenizer_dir=tokenizer_dir)
    r = run_cli("generate", str(tmp_path), "The module", "--max_new_tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The module") and len(r.stdout) > len("The module")
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: {tmp_path}\nprompt: ['a', 'b']\nmax_new_tokens: 3\ntemperature: 0\n")
    r = run_cli("generate", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---") == 2
    r = run_cli("generate", "--config", str(cfg), "--print_config")
    assert r.returncode == 0 and "max_new_tokens: 3" in r.stdout


def test_chat_set_refuses_non_finite_and_keeps_the_conversation(tokenizer_dir):
    from lillm.chat import ChatSession
    from lillm.generate import SamplingConfig

    session = ChatSession(tiny_model(vocab_size=load_tokenizer(tokenizer_dir).vocab_size),
                          load_tokenizer(tokenizer_dir), SamplingConfig(temperature=0.5))
    session.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for value in ("nan", "inf"):
        reply = session.command(f"/set temperature {value}")
        assert reply.startswith("invalid value") and "finite" in reply, reply
    assert session.sampling.temperature == 0.5 and len(session.history) == 2


def test_chat_survives_input_that_is_not_utf8(tokenizer_dir):
    # A line with undecodable bytes (kept as surrogates by a terminal in another encoding), then one a strict
    # stream cannot decode: each is said, and the conversation goes on to the next line.
    import io

    from lillm.chat import ChatSession, run_chat
    from lillm.generate import SamplingConfig

    tok = load_tokenizer(tokenizer_dir)
    session = ChatSession(tiny_model(vocab_size=tok.vocab_size), tok, SamplingConfig(max_new_tokens=2))
    lines = iter([b"hi \xff there".decode("utf-8", "surrogateescape"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"),
                  "and then"])

    def read(prompt):
        item = next(lines, None)
        if item is None:
            raise EOFError
        if isinstance(item, Exception):
            raise item
        return item

    out = io.StringIO()
    run_chat(session, out, read)
    said = out.getvalue()
    assert "were replaced" in said and "was skipped" in said, said
    users = [m["content"] for m in session.history if m["role"] == "user"]
    assert users == ["hi \ufffd there", "and then"]


def test_parse_errors_are_one_line_with_a_hint():
    for args, hint in ((["generate"], "see lillm generate --help"),
                       (["pretrain", "--config", "debug", "--train.lr", "abc"], "see lillm pretrain --help"),
                       (["nosuch"], "see lillm --help")):
        r = run_cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and hint in r.stderr, r.stderr
