"""Regenerate bench/proposals/*.patch (01 fused AdamW and 03 network.target_modules were applied in 088e129) against the current tree: python bench/proposals/regenerate.py (repo root).

Each patch is written from anchors in the current files, so it stays appliable while the files around
the anchors change; an anchor that is gone fails loudly (then the proposal needs a look)."""
import difflib
from pathlib import Path

ROOT = Path(".")
OUT = ROOT / "bench" / "proposals"


def edit(path, replacements):
    before = (ROOT / path).read_text()
    after = before
    for old, new in replacements:
        assert after.count(old) == 1, f"{path}: anchor not found once: {old[:60]!r}"
        after = after.replace(old, new)
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"a/{path}", f"b/{path}"))


RELEASE = [(
'''        self.validation = self._validation_set(held_out) if held_out and self.main else None
''',
'''        self.validation = self._validation_set(held_out) if held_out and self.main else None
        self._release_cached_encoders(held_out)
'''), (
'''    def _validation_set(self, items) -> ValidationSet:''',
'''    def _release_cached_encoders(self, held_out) -> None:
        """Drop what the caches made dead weight for the rest of the run (host RAM on CPU, VRAM on GPU): the
        text encoder(s) once every caption is in the text cache, the VAE's encoder half once every latent is
        in the latent cache. Sample previews and validation encode new prompts, so with either the text
        encoders stay; the VAE decoder always stays (previews decode)."""
        cfg, model = self.cfg, self.model
        sampling = bool(cfg.sample.prompts) and bool(cfg.sample.every_steps or cfg.sample.every_epochs)
        if isinstance(self.encode_text, TextEmbeddingCache) and not sampling and not held_out:
            captions = sorted({item.caption for item in self.dataset.items})
            for start in range(0, len(captions), 16):  # fill the cache now, a few captions per TE call
                self.encode_text(captions[start:start + 16])
            model.text_encoders.clear()
        if self.latents is not None and not cfg.dataset.random_crop:  # every latent was built above
            del model.vae.encoder, model.vae.quant_conv

    def _validation_set(self, items) -> ValidationSet:''')]

PLAN_ONCE = [(
'''        try:
            while position.step < self.total_steps:
                plan = self._epoch_batches(position.epoch)
''',
'''        try:
            plan_epoch, plan = None, []
            while position.step < self.total_steps:
                if plan_epoch != position.epoch:  # a pure function of (seed, epoch): built once per epoch, not per
                    plan_epoch, plan = position.epoch, self._epoch_batches(position.epoch)  # step (O(images) each)
''')]

patches = {
    "02-release-cached-encoders.patch": edit("trainer/loop.py", RELEASE),
    "04-epoch-plan-once.patch": edit("trainer/loop.py", PLAN_ONCE),
}
OUT.mkdir(parents=True, exist_ok=True)
for name, text in patches.items():
    (OUT / name).write_text(text)
    print(name, len(text.splitlines()), "lines")
