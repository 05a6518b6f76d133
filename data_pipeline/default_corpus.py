"""The embedded default corpora: real text read from where installed packages put it, never committed.

- ``english``: the English Wikipedia articles shipped in ``gensim``'s test data
  (``gensim.test.utils.datapath``, MediaWiki XML), cleaned of wiki markup with ``mwparserfromhell``.
- ``multilingual``: Debian's ``fortunes-*`` packages (German, Spanish, Italian, Russian, Chinese,
  Polish, Brazilian Portuguese, Czech; read from the files ``dpkg`` says each package installed),
  the Bulgarian Wikipedia articles in gensim's test data, and the English articles above.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from data_pipeline.corpus import InputFile
from data_pipeline.errors import ConfigError, CorpusError

DEFAULT_CORPORA = ("english", "multilingual")

# gensim test-data file -> language; redirects and non-article pages are skipped by the reader.
_GENSIM_WIKIPEDIA = {
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": "en",
    "enwiki-table-markup.xml.bz2": "en",
}
_GENSIM_WIKIPEDIA_MULTILINGUAL = {"bgwiki-latest-pages-articles-shortened.xml.bz2": "bg"}

# Debian package -> language of its fortunes.
FORTUNE_PACKAGES = {
    "fortunes-de": "de",
    "fortunes-es": "es",
    "fortunes-it": "it",
    "fortunes-ru": "ru",
    "fortunes-zh": "zh",
    "fortunes-pl": "pl",
    "fortunes-br": "pt",
    "fortunes-cs": "cs",
}
_FORTUNES_ROOT = "/usr/share/games/fortunes/"


def default_corpus_inputs(name: str = "english") -> list[InputFile]:
    """The input files of a default corpus; a clear error says what to install when they are missing."""
    if name == "english":
        return wikipedia_inputs(_GENSIM_WIKIPEDIA)
    if name == "multilingual":
        return fortune_inputs() + wikipedia_inputs(_GENSIM_WIKIPEDIA_MULTILINGUAL) + wikipedia_inputs(_GENSIM_WIKIPEDIA)
    raise ConfigError(f"default corpus must be one of {list(DEFAULT_CORPORA)}, got {name!r}")


def gensim_test_data_dir() -> Path:
    """Where gensim installed its test data (``gensim.test.utils.datapath('')``), found without
    importing gensim (its test utilities build a corpus and log when imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the default corpus is the Wikipedia sample in gensim's test data, and gensim is not installed: "
            "pip install gensim mwparserfromhell (or pip install -e '.[corpus]')"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def wikipedia_inputs(files: dict[str, str]) -> list[InputFile]:
    directory = gensim_test_data_dir()
    if importlib.util.find_spec("mwparserfromhell") is None:
        raise CorpusError("cleaning the default Wikipedia corpus needs mwparserfromhell: pip install mwparserfromhell")
    inputs = []
    for name, language in files.items():
        path = directory / name
        if not path.is_file():
            raise CorpusError(
                f"gensim's test data has no {name} (looked in {directory}); reinstall gensim: "
                "pip install --force-reinstall gensim"
            )
        inputs.append(InputFile(path=path, format="mediawiki", language=language, key=f"gensim/{name}"))
    return inputs


def fortune_inputs(packages: dict[str, str] | None = None) -> list[InputFile]:
    """The fortune files each Debian package installed, as dpkg lists them (offensive ones excluded)."""
    packages = FORTUNE_PACKAGES if packages is None else packages
    install_hint = "apt-get install " + " ".join(packages)
    if shutil.which("dpkg-query") is None:
        raise CorpusError(
            "the multilingual default corpus is read from Debian's fortunes-* packages, but dpkg-query is not "
            f"available on this machine; on Debian/Ubuntu run: {install_hint}"
        )
    inputs: list[InputFile] = []
    missing = []
    for package, language in packages.items():
        result = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            missing.append(package)
            continue
        for line in sorted(result.stdout.splitlines()):
            path = Path(line.strip())
            if not _is_fortune_text(path):
                continue
            key = f"{package}/{path.relative_to(_FORTUNES_ROOT).as_posix()}"
            inputs.append(InputFile(path=path, format="fortune", language=language, key=key))
    if missing:
        raise CorpusError(
            f"the multilingual default corpus needs the Debian packages {', '.join(missing)}, which are not "
            f"installed; run (as root): apt-get install {' '.join(missing)}"
        )
    if not inputs:
        raise CorpusError(
            f"the fortunes packages list no fortune files under {_FORTUNES_ROOT}; reinstall: {install_hint}"
        )
    return inputs


def _is_fortune_text(path: Path) -> bool:
    text = path.as_posix()
    return (
        text.startswith(_FORTUNES_ROOT)
        and not path.name.endswith((".dat", ".u8"))
        and "/off/" not in text  # offensive fortunes, rot13-encoded
        and not path.is_symlink()  # the same file under another name (e.g. cz/ -> cs/)
        and path.is_file()
        and path.stat().st_size > 0
    )
