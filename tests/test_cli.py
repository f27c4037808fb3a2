from lillm.hf import export_hf
from lillm.tokenizer import load_tokenizer

from .conftest import run_cli, tiny_model


def test_help_lists_subcommands_with_text():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("generate", "train-tokenizer", "prepare", "export", "checkpoint"):
        assert cmd in r.stdout
    r = run_cli("generate", "--help")
    assert r.returncode == 0 and "Softmax temperature" in r.stdout and "--print_config" in r.stdout


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


def test_generate_bad_input_exits_2_without_traceback(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    export_hf(tiny_model(vocab_size=tok.vocab_size, max_seq_len=32, max_batch_size=2), tmp_path,
              tokenizer_dir=tokenizer_dir)
    cases = [
        (["generate", str(tmp_path / "missing"), "x"], "no such file"),
        (["generate", str(tokenizer_dir), "x"], "not a model directory"),
        (["generate", str(tmp_path), "word " * 100], "longer than max_seq_len=32"),
        (["generate", str(tmp_path), '["a", "b", "c"]'], "max_batch_size=2"),
        (["generate", str(tmp_path), "x", "--top_p", "2"], "top_p"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_non_finite_sampling_options_exit_2(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    export_hf(tiny_model(vocab_size=tok.vocab_size), tmp_path, tokenizer_dir=tokenizer_dir)
    for option in ("--temperature", "--top_p"):
        r = run_cli("generate", str(tmp_path), "x", f"{option}=.nan")  # YAML's NaN
        assert r.returncode == 2, (option, r.stderr)
        assert "must be a finite number" in r.stderr and "Traceback" not in r.stderr, r.stderr


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


def test_bad_output_paths_and_options_exit_2_and_change_nothing(tmp_path, tokenizer_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["train-tokenizer", "pydoc", str(a_file), "--vocab_size", "300"], "a_file: File exists"),
        (["prepare", "pydoc", str(tokenizer_dir), str(a_file)], "a_file: File exists"),
        (["train-tokenizer", "pydoc", str(tmp_path / "t"), "--min_frequency", "-3"], "min_frequency must be >= 1"),
        (["prepare", str(empty), str(tokenizer_dir), str(tmp_path / "p1")], "holds no documents"),
        (["prepare", "pydoc", str(tokenizer_dir), str(tmp_path / "p2"), "--num_workers", "-4"], "num_workers"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        lines = r.stderr.strip().splitlines()  # a progress bar may come first
        assert lines[-1].startswith("lillm: error:") and r.stderr.count("error") == 1, (args, r.stderr)
    assert a_file.read_text() == "keep me"


def test_parse_errors_are_one_line_with_a_hint():
    for args, hint in ((["generate"], "see lillm generate --help"),
                       (["pretrain", "--config", "debug", "--train.lr", "abc"], "see pretrain.py --help"),
                       (["nosuch"], "see lillm --help")):
        r = run_cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and hint in r.stderr, r.stderr
