"""The `model`, `tokenizer` and `variant` fixtures in ordinary Python tests."""

from __future__ import annotations

TEST_FILE = '''
def test_greedy_answer(model, tokenizer, variant):
    ids = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, (variant.key, text)


def test_tokenizer_only(tokenizer):
    assert tokenizer.pad_token is not None
'''


def test_python_tests_run_once_per_variant_and_share_the_pool(project):
    (project.path / "test_mine.py").write_text(TEST_FILE)
    result = project.run("test_mine.py", "-v", "--variants", "fp16,nf4")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*test_tokenizer_only PASSED*", "*test_greedy_answer?fp16? PASSED*", "*test_greedy_answer?nf4? PASSED*",
        "loaded fp16: 1x*", "loaded nf4: 1x*",
    ])
