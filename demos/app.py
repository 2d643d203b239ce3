"""safegen's Gradio demo: one prompt, generated unprotected and protected side by side, with the safety report
made readable.

Start it with ``safegen demo`` (binds 127.0.0.1:7860; ``--host``/``--port`` to change) or
``python demos/app.py [--host H] [--port P]``. It needs gradio: ``pip install 'safegen[demo]'``.

The logic (input validation, guard availability, the comparison run, the report as HTML) lives in
:mod:`safegen.demo` and is unit-tested there; this file is the UI around it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from safegen import demo as sd  # noqa: E402
from safegen.policy import builtin_policies  # noqa: E402

logger = logging.getLogger("safegen.demo")

TITLE = "safegen demo"
INTRO = """\
# safegen: safety guards inside the diffusers denoising loop

Type a prompt and press **Generate**. The same seed is generated twice: once **unprotected** and once
**protected** by the guards you switch on. The report says which guard acted and why, on which prompt tokens,
at which step LVD stopped, and how many UNet steps (and seconds) that saved.
"""
MODEL_NOTE = """\
The **embedded default model** is a small Stable Diffusion pipeline trained on a toy world (64×64): it draws the
object the prompt names in the colour it names; images of unsafe prompts carry their category's hazard mark in
the top-left corner. It runs on a CPU in about a second. Any other Stable Diffusion 1.x/2.x or SDXL pipeline folder
(or a hub id, online) works too.
"""
CSS = """
.sg-report table.sg-guards { border-collapse: collapse; width: 100%; font-size: 0.9em; margin: 8px 0; }
.sg-report table.sg-guards th, .sg-report table.sg-guards td {
    border: 1px solid var(--border-color-primary); padding: 4px 6px; text-align: left; vertical-align: top; }
.sg-report .sg-stop { font-weight: 600; }
.sg-report p { margin: 6px 0; }
#sg-guards .sg-unavailable { opacity: 0.75; }
"""
MODEL_CHOICES = [("Embedded default model (64×64)", sd.DEFAULT_MODEL)]
IMAGE_SIZE = 256


def _steps_for(model: str) -> int:
    from safegen.cli import DEFAULT_STEPS

    return DEFAULT_STEPS.get(model, 30)


class DemoApp:
    """The UI and the state it shares between users: a cache of loaded pipelines guarded by one lock (a pipeline
    is protected and unprotected in place, so one generation runs at a time; the queue holds the others)."""

    def __init__(self, model: str = sd.DEFAULT_MODEL, device: str = "auto"):
        self.model = sd.validate_model(model)
        self.device = device
        self.cache = sd.PipelineCache(size=2, device=device)
        self.keys = [o.key for o in sd.guard_options(self.model)]

    # ------------------------------------------------------------------ events
    def guard_toggles(self, model: Any):
        """Checkbox updates for ``model``: unavailable guards are disabled, switched off and say why."""
        try:
            model = sd.validate_model(model)
        except sd.DemoInputError as e:
            gr.Warning(str(e))
            return [gr.Checkbox() for _ in self.keys] + [gr.Slider()]
        options = {o.key: o for o in sd.guard_options(model)}
        on = set(sd.default_guard_keys(options.values(), model))
        updates = []
        for key in self.keys:
            o = options[key]
            updates.append(gr.Checkbox(value=key in on, interactive=o.available,
                                       info=o.description if o.available else o.reason,
                                       elem_classes=None if o.available else ["sg-unavailable"]))
        return updates + [gr.Slider(value=_steps_for(model))]

    def generate(self, prompt, model, policy, sensitivity, steps, seed, sld_preset, *toggles,
                 progress=gr.Progress()):
        try:
            text = sd.validate_prompt(prompt)
            model = sd.validate_model(model)
            options = sd.guard_options(model)
            guards = sd.validate_guards([k for k, on in zip(self.keys, toggles) if on], options, sld_preset)
            pol = sd.validate_policy(policy, sensitivity)
            steps = sd.validate_steps(steps)
            seed = sd.validate_seed(seed)
            with self.cache.lock:
                if model not in self.cache.loaded():
                    progress(0.0, desc=f"loading model {model}")
                pipe = self.cache.get(model)
                from safegen.cli import TINY_MODELS, _lexical_only

                if model in TINY_MODELS:  # random text encoders: only literal concept phrases mean anything
                    _lexical_only(pol)
                comp = sd.run_comparison(pipe, text, guards=guards, policy=pol, steps=steps, seed=seed,
                                         progress=lambda frac, desc: progress(frac, desc=desc))
        except sd.DemoInputError as e:
            raise gr.Error(str(e), title="Please check the input", print_exception=False) from None
        except Exception as e:  # anything else: a message for the user, the traceback for the server log
            logger.exception("safegen demo: generation failed")
            raise gr.Error(f"{type(e).__name__}: {e}", title="Generation failed", print_exception=False) from None
        report = comp.report
        plain = sd.display_image(comp.plain_image, IMAGE_SIZE)
        if report.blocked or comp.protected_image is None:
            protected = sd.placeholder_image(report, IMAGE_SIZE)
        else:
            protected = sd.display_image(comp.protected_image, IMAGE_SIZE)
        html_report = sd.report_html(report, steps=steps, seconds_per_step=comp.seconds_per_step,
                                     seconds=comp.protected_seconds, concepts=pol.concepts())
        raw = {"model": model, "guards": guards, "policy": pol.name, "sensitivity": pol.sensitivity,
               "steps": steps, "seed": seed, "unprotected_seconds": round(comp.plain_seconds, 4),
               "protected_seconds": round(comp.protected_seconds, 4), "report": sd.report_json(report)}
        return (gr.Image(value=plain, label=sd.unprotected_caption(steps, comp.plain_seconds)),
                gr.Image(value=protected, label=sd.protected_caption(report, comp.protected_seconds)),
                html_report, raw)

    # ------------------------------------------------------------------ layout
    def build(self) -> gr.Blocks:
        options = sd.guard_options(self.model)
        on = set(sd.default_guard_keys(options, self.model))
        with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
            gr.Markdown(INTRO)
            with gr.Row():
                with gr.Column(scale=5):
                    prompt = gr.Textbox(label="Prompt", lines=2, max_length=sd.MAX_PROMPT_CHARS, elem_id="prompt",
                                        placeholder="a red bus on a street",
                                        info=f"at most {sd.MAX_PROMPT_CHARS} characters")
                    with gr.Row():
                        model = gr.Dropdown(MODEL_CHOICES, value=self.model, allow_custom_value=True,
                                            label="Model", elem_id="model", scale=3,
                                            info="the embedded default model, or a local pipeline folder or hub id")
                        policy = gr.Dropdown(builtin_policies(), value="default", allow_custom_value=True,
                                             label="Policy", elem_id="policy", scale=2,
                                             info="a built-in policy or a .yaml/.json file")
                    with gr.Row():
                        sensitivity = gr.Slider(sd.MIN_SENSITIVITY, 4.0, value=1.0, step=0.05, label="Sensitivity",
                                                info="every guard compares to threshold / sensitivity: "
                                                     "higher flags more", elem_id="sensitivity")
                        steps = gr.Slider(sd.MIN_STEPS, sd.MAX_STEPS, value=_steps_for(self.model), step=1,
                                          label="Steps", elem_id="steps")
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=sd.MAX_SEED, label="Seed",
                                         elem_id="seed")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=4, elem_id="sg-guards"):
                    gr.Markdown("**Guards**")
                    toggles = []
                    for o in options:
                        toggles.append(gr.Checkbox(value=o.key in on, label=o.label, interactive=o.available,
                                                   info=o.description if o.available else o.reason,
                                                   elem_id=f"guard-{o.key}",
                                                   elem_classes=None if o.available else ["sg-unavailable"]))
                    sld_preset = gr.Radio(list(sd.SLD_PRESETS), value="medium", label="SLD strength",
                                          elem_id="sld-preset")
            with gr.Row():
                plain_img = gr.Image(label="Unprotected", type="pil", interactive=False, height=IMAGE_SIZE + 24,
                                     elem_id="plain-image")
                safe_img = gr.Image(label="Protected", type="pil", interactive=False, height=IMAGE_SIZE + 24,
                                    elem_id="protected-image")
            report = gr.HTML("<p>The safety report appears here.</p>", elem_id="report")
            with gr.Accordion("Raw report (JSON)", open=False):
                raw = gr.JSON(elem_id="report-json")
            with gr.Row():
                gr.Examples([[p] for p in sd.examples("benign")], inputs=[prompt],
                            label="Benign examples (COCO captions)", cache_examples=False)
                gr.Examples([[p] for p in sd.examples("unsafe")], inputs=[prompt],
                            label="Unsafe examples (CoProV2 test prompts)", cache_examples=False)
            gr.Markdown(MODEL_NOTE)

            inputs = [prompt, model, policy, sensitivity, steps, seed, sld_preset, *toggles]
            outputs = [plain_img, safe_img, report, raw]
            for trigger in (generate.click, prompt.submit):
                trigger(self.generate, inputs=inputs, outputs=outputs, concurrency_limit=1,
                        concurrency_id="pipeline", api_name=False if trigger is prompt.submit else "generate")
            # queued but unlimited: it only looks at files, so it never waits behind a generation
            model.change(self.guard_toggles, inputs=[model], outputs=[*toggles, steps], concurrency_limit=None,
                         api_name=False)
        return app

    def preload(self) -> threading.Thread:
        """Load the starting model in the background, so the first Generate does not wait for it."""
        def load():
            try:
                self.cache.get(self.model)
                logger.info("safegen demo: model %r loaded", self.model)
            except Exception as e:  # shown to the user on the first Generate, which tries again
                logger.warning("safegen demo: could not preload model %r: %s", self.model, e)

        thread = threading.Thread(target=load, name="safegen-demo-preload", daemon=True)
        thread.start()
        return thread


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = sd.DEFAULT_MODEL, device: str = "auto", *,
           max_queue: int = 32, block: bool = True, preload: bool = True):
    """Build the demo and serve it on ``host:port`` (loopback by default). ``block=False`` returns the running
    app (``app.close()`` stops it)."""
    demo = DemoApp(model=model, device=device)
    app = demo.build()
    if preload:
        demo.preload()
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    theme = gr.themes.Soft(font=("ui-sans-serif", "system-ui", "sans-serif"),
                           font_mono=("ui-monospace", "Consolas", "monospace"))  # no web fonts: works offline
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, ssr_mode=False,
               theme=theme, css=CSS, footer_links=["api", "settings"])
    return app


if __name__ == "__main__":  # python demos/app.py [--host H] [--port P] [--model M] [--device D]
    from safegen.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
