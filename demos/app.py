"""safegen's Gradio demo: one prompt, generated unprotected and protected side by side, with the safety report
made readable.

Start it with ``safegen demo`` (binds 127.0.0.1:7860; ``--host``/``--port`` to change) or
``python demos/app.py [--host H] [--port P]``. It needs gradio: ``pip install 'safegen[demo]'``.

Safe to expose: another address than loopback needs a login (``--auth`` or ``SAFEGEN_DEMO_AUTH``), and then the
unprotected image is never generated; models and policies come from an allow-list fixed at start-up
(``--allow-model``, ``--allow-policy``), never from a path typed in the page; errors about them are generic on
the page, with the detail in the server log.

The logic (input validation, guard availability, the comparison run, the report as HTML) lives in
:mod:`safegen.demo` and is unit-tested there; this file is the UI around it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from safegen import demo as sd  # noqa: E402
from safegen.loading import DEFAULT_STEPS, TINY_MODELS, lexical_only  # noqa: E402

logger = logging.getLogger("safegen.demo")

TITLE = "safegen demo"
INTRO = """\
# safegen: safety guards inside the diffusers denoising loop

Type a prompt and press **Generate**. The same seed is generated twice: once **unprotected** and once
**protected** by the guards you switch on. The report says which guard acted and why, on which prompt tokens,
at which step LVD stopped, and how many UNet steps (and seconds) that saved.
"""
INTRO_REMOTE = """\
# safegen: safety guards inside the diffusers denoising loop

Type a prompt and press **Generate**. It is generated **protected** by the guards you switch on. The report says
which guard acted and why, on which prompt tokens, at which step LVD stopped, and how many UNet steps (and
seconds) that saved.
"""
MODEL_NOTE = """\
The **embedded default model** is a small Stable Diffusion pipeline trained on a toy world (64×64): it draws the
object the prompt names in the colour it names; images of unsafe prompts carry their category's hazard mark in
the top-left corner. It runs on a CPU in about a second. Any other Stable Diffusion 1.x/2.x or SDXL pipeline
(safetensors weights) can be offered too: start the server with `--allow-model FOLDER_OR_HUB_ID`.
"""
VIDEO_NOTE = """\
The **embedded default video model** is AnimateDiff over the image model, trained on the same toy world: the
object slides across 8 frames of 64×64, and an unsafe prompt's clip carries its hazard mark, on some clips only
from a later frame on. It runs the policy's guards; the strip below the clips frames in red the frames LVD
flagged (where it saw the hazard), and a clip LVD stops is never decoded.
"""
REMOTE_NOTE = """The unprotected comparison image is off on this server: it is generated only on a demo served to this machine
(127.0.0.1).
"""
CSS = """
.sg-report table.sg-guards { border-collapse: collapse; width: 100%; font-size: 0.9em; margin: 8px 0; }
.sg-report table.sg-guards th, .sg-report table.sg-guards td {
    border: 1px solid var(--border-color-primary); padding: 4px 6px; text-align: left; vertical-align: top; }
.sg-report .sg-stop { font-weight: 600; }
.sg-report p { margin: 6px 0; }
#sg-guards .sg-unavailable { opacity: 0.75; }
"""
IMAGE_SIZE = 256


def _steps_for(model: str) -> int:
    return DEFAULT_STEPS.get(model, 30)


class DemoApp:
    """The UI and the state it shares between users: a cache of loaded pipelines guarded by one lock (a pipeline
    is protected and unprotected in place, so one generation runs at a time; the queue holds the others).

    ``settings`` (:func:`safegen.demo.demo_settings`) fixes what users may pick: the models and policies offered
    and whether the unprotected image is generated."""

    def __init__(self, settings: sd.DemoSettings | None = None, device: str = "auto", *,
                 cache: sd.PipelineCache | None = None):
        self.settings = settings if settings is not None else sd.demo_settings()
        self.model = self.settings.start_model
        self.device = device
        self.cache = cache if cache is not None else sd.PipelineCache(size=2, device=device)
        self.keys = [o.key for o in sd.guard_options(self.settings.models[self.model])]

    # ------------------------------------------------------------------ events
    def guard_toggles(self, model: Any):
        """Checkbox updates for ``model``: unavailable guards are disabled, switched off and say why."""
        try:
            _, spec = sd.choose_model(model, self.settings)
        except sd.DemoInputError as e:
            gr.Warning(str(e))
            return [gr.Checkbox() for _ in self.keys] + [gr.Slider()]
        options = {o.key: o for o in sd.guard_options(spec)}
        on = set(sd.default_guard_keys(options.values(), spec))
        updates = []
        for key in self.keys:
            o = options[key]
            updates.append(gr.Checkbox(value=key in on, interactive=o.available,
                                       info=o.description if o.available else o.reason,
                                       elem_classes=None if o.available else ["sg-unavailable"]))
        return updates + [gr.Slider(value=_steps_for(spec))]

    def _pipeline(self, key: str, spec: str, progress):
        """The loaded pipeline of an offered model; a load error is logged and shown without its detail (it may
        name server paths)."""
        if spec not in self.cache.loaded():
            progress(0.0, desc=f"loading model {key}")
        try:
            return self.cache.get(spec)
        except sd.DemoInputError as e:
            logger.warning("safegen demo: model %r (%s) could not be loaded: %s", key, spec, e)
            raise sd.DemoInputError(f"model {key!r} could not be loaded; see the server log") from None

    def generate(self, prompt, model, policy, sensitivity, steps, seed, sld_preset, *toggles,
                 progress=gr.Progress()):
        try:
            text = sd.validate_prompt(prompt)
            key, spec = sd.choose_model(model, self.settings)
            options = sd.guard_options(spec)
            guards = sd.validate_guards([k for k, on in zip(self.keys, toggles) if on], options, sld_preset)
            pol = sd.choose_policy(policy, sensitivity, self.settings)
            steps = sd.validate_steps(steps)
            seed = sd.validate_seed(seed)
            with self.cache.lock:
                pipe = self._pipeline(key, spec, progress)
                if spec in TINY_MODELS:  # random text encoders: only literal concept phrases mean anything
                    lexical_only(pol)
                comp = sd.run_comparison(pipe, text, guards=guards, policy=pol, steps=steps, seed=seed,
                                         progress=lambda frac, desc: progress(frac, desc=desc),
                                         unprotected=self.settings.unprotected)
        except sd.DemoInputError as e:
            raise gr.Error(str(e), title="Please check the input", print_exception=False) from None
        except Exception as e:  # anything else: a short message for the user, the traceback for the server log
            logger.exception("safegen demo: generation failed")
            raise gr.Error(f"generation failed ({type(e).__name__}); the details are in the server log",
                           title="Generation failed", print_exception=False) from None
        report = comp.report
        if comp.plain_image is not None:
            plain = gr.Image(value=sd.display_image(comp.plain_image, IMAGE_SIZE),
                             label=sd.unprotected_caption(steps, comp.plain_seconds))
        else:
            plain = gr.Image(value=None, label="Unprotected · not generated on this server")
        if report.blocked or comp.protected_image is None:
            protected = sd.placeholder_image(report, IMAGE_SIZE)
        else:
            protected = sd.display_image(comp.protected_image, IMAGE_SIZE)
        html_report = sd.report_html(report, steps=steps, seconds_per_step=comp.seconds_per_step,
                                     seconds=comp.protected_seconds, concepts=pol.concepts())
        raw = {"model": key, "guards": guards, "policy": pol.name, "sensitivity": pol.sensitivity,
               "steps": steps, "seed": seed, "protected_seconds": round(comp.protected_seconds, 4),
               "report": sd.report_json(report)}
        if comp.plain_seconds is not None:
            raw["unprotected_seconds"] = round(comp.plain_seconds, 4)
        return (plain, gr.Image(value=protected, label=sd.protected_caption(report, comp.protected_seconds)),
                html_report, raw)

    def generate_video(self, prompt, policy, sensitivity, steps, seed, progress=gr.Progress()):
        """The video tab: the embedded default video model, unprotected and protected by the policy's guards from
        the same seed, as GIFs; the frames LVD flagged are framed in red in a strip of the unprotected clip (or of
        the protected one where the unprotected is not generated)."""
        import tempfile

        from safegen.default_video_model import VIDEO_FRAMES
        from safegen.loading import DEFAULT_VIDEO_MODEL

        try:
            text = sd.validate_prompt(prompt)
            pol = sd.choose_policy(policy, sensitivity, self.settings)
            steps = sd.validate_steps(steps)
            seed = sd.validate_seed(seed)
            with self.cache.lock:
                pipe = self._pipeline("default-video", DEFAULT_VIDEO_MODEL, progress)
                comp = sd.run_comparison(pipe, text, guards=None, policy=pol, steps=steps, seed=seed,
                                         progress=lambda frac, desc: progress(frac, desc=desc),
                                         unprotected=self.settings.unprotected, num_frames=VIDEO_FRAMES)
        except sd.DemoInputError as e:
            raise gr.Error(str(e), title="Please check the input", print_exception=False) from None
        except Exception as e:
            logger.exception("safegen demo: video generation failed")
            raise gr.Error(f"generation failed ({type(e).__name__}); the details are in the server log",
                           title="Generation failed", print_exception=False) from None
        report = comp.report
        folder = Path(tempfile.mkdtemp(prefix="safegen-demo-video-"))
        if comp.plain_image is not None:
            plain = gr.Image(value=str(sd.write_gif(comp.plain_image, folder / "unprotected.gif")),
                             label=sd.unprotected_caption(steps, comp.plain_seconds))
        else:
            plain = gr.Image(value=None, label="Unprotected · not generated on this server")
        if report.blocked or not comp.protected_image:
            shown = sd.placeholder_image(report, IMAGE_SIZE)
            shown.save(folder / "protected.png")
            protected = str(folder / "protected.png")
        else:
            protected = str(sd.write_gif(comp.protected_image, folder / "protected.gif"))
        flagged = sd.flagged_frames(report)
        source = comp.plain_image if comp.plain_image is not None else (comp.protected_image or [])
        strip = sd.frame_strip(source, flagged) if source else None
        which = "unprotected" if comp.plain_image is not None else "protected"
        html_report = sd.report_html(report, steps=steps, seconds_per_step=comp.seconds_per_step,
                                     seconds=comp.protected_seconds, concepts=pol.concepts())
        raw = {"model": "default-video", "guards": list(pol.guards), "policy": pol.name, "steps": steps,
               "seed": seed, "frames": VIDEO_FRAMES, "lvd_flagged_frames": flagged, "report": sd.report_json(report)}
        return (plain, gr.Image(value=protected, label=sd.protected_caption(report, comp.protected_seconds)),
                gr.Image(value=strip, label=f"{which} frames · LVD flagged (red): {flagged or 'none'}"),
                html_report, raw)

    def api_function(self):
        """:meth:`generate` with one named parameter per input, so the page's API (``/generate``) names every
        toggle (``guard_latent_guard``, ``guard_safree``, ...) instead of numbering them."""
        import inspect

        fixed = ["prompt", "model", "policy", "sensitivity", "steps", "seed", "sld_preset"]
        toggles = [f"guard_{key.replace('-', '_')}" for key in self.keys]

        def run(*args, progress=gr.Progress()):
            return self.generate(*args, progress=progress)

        P = inspect.Parameter
        run.__signature__ = inspect.Signature(
            [P(n, P.POSITIONAL_OR_KEYWORD) for n in fixed + toggles]
            + [P("progress", P.KEYWORD_ONLY, default=gr.Progress())])
        run.__name__ = "generate"
        return run

    # ------------------------------------------------------------------ layout
    def build(self) -> gr.Blocks:
        spec = self.settings.models[self.model]
        options = sd.guard_options(spec)
        on = set(sd.default_guard_keys(options, spec))
        with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
            gr.Markdown(INTRO if self.settings.unprotected else INTRO_REMOTE)
            with gr.Tab("Image", id="image"):
                self._image_tab(spec, options, on)
            if _video_model_shipped():
                with gr.Tab("Video", id="video"):
                    self._video_tab()
        return app

    def _image_tab(self, spec, options, on) -> None:
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=sd.MAX_PROMPT_CHARS, elem_id="prompt",
                                    placeholder="a red bus on a street",
                                    info=f"at most {sd.MAX_PROMPT_CHARS} characters")
                with gr.Row():
                    # only what the server offers: a page never names a server path
                    model = gr.Dropdown(self.settings.model_choices(), value=self.model,
                                        allow_custom_value=False, label="Model", elem_id="model", scale=3,
                                        info="the models this server offers")
                    policies = self.settings.policy_choices()
                    start_policy = "default" if "default" in self.settings.policies else policies[0][1]
                    policy = gr.Dropdown(policies, value=start_policy, allow_custom_value=False,
                                         label="Policy", elem_id="policy", scale=2,
                                         info="the policies this server offers")
                with gr.Row():
                    sensitivity = gr.Slider(sd.MIN_SENSITIVITY, 4.0, value=1.0, step=0.05, label="Sensitivity",
                                            info="every guard compares to threshold / sensitivity: "
                                                 "higher flags more", elem_id="sensitivity")
                    steps = gr.Slider(sd.MIN_STEPS, sd.MAX_STEPS, value=_steps_for(spec), step=1,
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
            # off (and never generated) unless the server runs for this machine only
            plain_img = gr.Image(label="Unprotected", type="pil", interactive=False, height=IMAGE_SIZE + 24,
                                 elem_id="plain-image", visible=self.settings.unprotected)
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
        gr.Markdown(MODEL_NOTE if self.settings.unprotected else MODEL_NOTE + "\n" + REMOTE_NOTE)

        inputs = [prompt, model, policy, sensitivity, steps, seed, sld_preset, *toggles]
        outputs = [plain_img, safe_img, report, raw]
        # one API endpoint, /generate, with a named parameter per input (guard_<key> for the toggles); Enter
        # in the prompt box runs the same function without a second endpoint
        run = self.api_function()
        generate.click(run, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="pipeline",
                       api_name="generate")
        prompt.submit(run, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="pipeline",
                      api_name=False)
        # queued but unlimited: it only looks at files, so it never waits behind a generation
        model.change(self.guard_toggles, inputs=[model], outputs=[*toggles, steps], concurrency_limit=None,
                     api_name=False)

    def _video_tab(self) -> None:
        from safegen.loading import DEFAULT_VIDEO_MODEL

        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, max_length=sd.MAX_PROMPT_CHARS, elem_id="video-prompt",
                                placeholder="a red car driving", scale=5)
            with gr.Column(scale=4):
                policies = self.settings.policy_choices()
                start_policy = "default" if "default" in self.settings.policies else policies[0][1]
                policy = gr.Dropdown(policies, value=start_policy, allow_custom_value=False, label="Policy",
                                     elem_id="video-policy", info="its guards protect the clip")
                sensitivity = gr.Slider(sd.MIN_SENSITIVITY, 4.0, value=1.0, step=0.05, label="Sensitivity",
                                        elem_id="video-sensitivity")
        with gr.Row():
            steps = gr.Slider(sd.MIN_STEPS, sd.MAX_STEPS, value=_steps_for(DEFAULT_VIDEO_MODEL), step=1,
                              label="Steps", elem_id="video-steps")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=sd.MAX_SEED, label="Seed", elem_id="video-seed")
            generate = gr.Button("Generate video", variant="primary", elem_id="generate-video")
        with gr.Row():
            plain = gr.Image(label="Unprotected", type="filepath", interactive=False, height=IMAGE_SIZE + 24,
                             elem_id="video-plain", visible=self.settings.unprotected)
            safe = gr.Image(label="Protected", type="filepath", interactive=False, height=IMAGE_SIZE + 24,
                            elem_id="video-protected")
        strip = gr.Image(label="Frames · LVD flagged (red)", type="pil", interactive=False, elem_id="video-frames")
        report = gr.HTML("<p>The safety report appears here.</p>", elem_id="video-report")
        with gr.Accordion("Raw report (JSON)", open=False):
            raw = gr.JSON(elem_id="video-report-json")
        gr.Markdown(VIDEO_NOTE)
        generate.click(self.generate_video, inputs=[prompt, policy, sensitivity, steps, seed],
                       outputs=[plain, safe, strip, report, raw], concurrency_limit=1, concurrency_id="pipeline",
                       api_name="generate_video")

    def preload(self) -> threading.Thread:
        """Load the starting model in the background, so the first Generate does not wait for it."""
        def load():
            try:
                self.cache.get(self.settings.models[self.model])
                logger.info("safegen demo: model %r loaded", self.model)
            except Exception as e:  # shown to the user on the first Generate, which tries again
                logger.warning("safegen demo: could not preload model %r: %s", self.model, e)

        thread = threading.Thread(target=load, name="safegen-demo-preload", daemon=True)
        thread.start()
        return thread


def _video_model_shipped() -> bool:
    """Whether this installation has the embedded default video model (the video tab needs it)."""
    from safegen.default_video_model import default_video_folder

    return (default_video_folder() / "model_index.json").is_file()


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = sd.DEFAULT_MODEL, device: str = "auto", *,
           settings: sd.DemoSettings | None = None, auth: tuple[str, str] | None = None, unprotected: bool = True,
           allow_models=(), allow_policies=(), max_queue: int = 32, block: bool = True, preload: bool = True):
    """Build the demo and serve it on ``host:port`` (loopback by default). ``block=False`` returns the running
    app (``app.close()`` stops it).

    Another address than loopback needs ``auth=(user, password)`` (:class:`safegen.demo.DemoInputError`
    otherwise), and there the unprotected image is never generated. ``settings`` (else built from ``model``,
    ``allow_models``, ``allow_policies`` and ``unprotected``) is the allow-list users pick from."""
    loopback = sd.is_loopback(host)
    if not loopback and not auth:
        raise sd.DemoInputError(f"serving {host} makes the demo reachable from other machines; give auth=(user, "
                                "password), or serve 127.0.0.1")
    if settings is None:
        settings = sd.demo_settings(model, allow_models, allow_policies, unprotected=unprotected)
    if not loopback and settings.unprotected:
        settings = dataclasses.replace(settings, unprotected=False)
    demo = DemoApp(settings, device=device)
    app = demo.build()
    if preload:
        demo.preload()
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    theme = gr.themes.Soft(font=("ui-sans-serif", "system-ui", "sans-serif"),
                           font_mono=("ui-monospace", "Consolas", "monospace"))  # no web fonts: works offline
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, ssr_mode=False,
               theme=theme, css=CSS, footer_links=["api", "settings"], auth=tuple(auth) if auth else None,
               auth_message="safegen demo: log in with the user and password the operator gave you")
    return app


if __name__ == "__main__":  # python demos/app.py [--host H] [--port P] [--model M] [--auth U:P] ...
    from safegen.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
