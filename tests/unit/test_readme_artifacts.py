"""Every results file the README cites is in the repository: a cited model that was never committed (a
git-ignored ``*.onnx`` a plain ``git add`` skips) is a claim nobody can check."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"benchmarks/results/[A-Za-z0-9_./-]+\.(?:onnx|json|md|pt|png|gz|txt|jsonl)")


def cited_results_files() -> list[str]:
    return sorted(set(CITED.findall((ROOT / "README.md").read_text())))


def test_every_results_file_the_readme_cites_exists():
    cited = cited_results_files()
    assert cited, "the README cites no results file: the pattern is out of date"
    missing = [p for p in cited if not (ROOT / p).is_file()]
    assert not missing, f"the README cites files that are not there: {missing}"


def test_no_cited_results_file_is_git_ignored():
    cited = cited_results_files()
    try:
        res = subprocess.run(
            ["git", "check-ignore", "--no-index", *cited], cwd=ROOT, capture_output=True, text=True
        )
    except FileNotFoundError:  # no git on this machine: the existence test above still runs
        return
    if res.returncode == 128:  # not a git checkout (an sdist)
        return
    assert res.stdout.strip() == "", (
        f"git ignores cited results files, so a plain `git add` skips them: {res.stdout}"
    )
