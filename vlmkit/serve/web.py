"""The Gradio app: images (or a video's frames), in-context examples, a streamed multi-turn chat
with a stop button and generation settings, and the model card beside it."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from vlmkit.core.errors import VlmkitError
from vlmkit.serve.inputs import BadInput, image_from_file
from vlmkit.serve.worker import Busy, ModelWorker, Settings


def _even_frames(frames: list[Any], count: int) -> list[Any]:
    """``count`` frames picked evenly (in order) from ``frames``; all of them when there are fewer."""
    if len(frames) <= count:
        return list(frames)
    return [frames[round(i * (len(frames) - 1) / (count - 1))] for i in range(count)] if count > 1 else frames[:1]


def _paths(files: Any) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def build_app(worker: ModelWorker, card: str, video_frames: int | None) -> gr.Blocks:
    """``video_frames``: the recipe's frames per clip when its data has video, else ``None``."""
    limits = worker.limits
    stops: dict[str, threading.Event] = {}

    with gr.Blocks(title=f"vlmkit: {worker.name}") as app:
        history = gr.State([])       # [(question, answer)]
        examples = gr.State([])      # [(image path, question, answer)]
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label=worker.name, height=420, elem_id="chat")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the images", show_label=False, scale=4,
                                          elem_id="question", max_length=limits.max_text_chars)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", scale=1, elem_id="stop")
                    clear = gr.Button("New conversation", scale=1, elem_id="clear")
                images = gr.File(label=f"Images (up to {limits.max_images})", file_count="multiple",
                                 file_types=["image"], elem_id="images")
                as_video = gr.Checkbox(
                    label=f"These images are the frames of one video clip (the model takes {video_frames} frames)"
                    if video_frames else "Video: this recipe's data has no video", value=False,
                    interactive=video_frames is not None, elem_id="as_video")
                with gr.Accordion("In-context examples (image, question, answer), shown before the question", open=True):
                    with gr.Row():
                        ex_image = gr.Image(type="filepath", label="Example image", height=160, elem_id="ex_image")
                        with gr.Column():
                            ex_question = gr.Textbox(label="Example question", elem_id="ex_question")
                            ex_answer = gr.Textbox(label="Example answer", elem_id="ex_answer")
                            with gr.Row():
                                add = gr.Button("Add example", elem_id="add_example")
                                drop = gr.Button("Remove all examples", elem_id="drop_examples")
                    shown_examples = gr.Markdown("No in-context examples.", elem_id="examples_list")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, limits.max_new_tokens, value=min(32, limits.max_new_tokens), step=1,
                                        label="max new tokens")
                    decoding = gr.Radio(["greedy", "sampling"], value="greedy", label="decoding")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (sampling)")
                    beams = gr.Slider(1, limits.max_beams, value=1, step=1,
                                      label="beams (greedy; the answer then appears at the end)")
            with gr.Column(scale=2):
                gr.Markdown(card, elem_id="model_card")

        def describe(items: list[tuple[str, str, str]]) -> str:
            if not items:
                return "No in-context examples."
            return "\n".join(f"{i + 1}. *{q}* → {a}" for i, (_, q, a) in enumerate(items))

        def add_example(items, path, q, a):
            if not path:
                raise gr.Error("an in-context example needs an image")
            if not (q or "").strip() or not (a or "").strip():
                raise gr.Error("an in-context example needs a question and an answer")
            items = list(items) + [(path, q.strip(), a.strip())]
            return items, describe(items), None, "", ""

        add.click(add_example, [examples, ex_image, ex_question, ex_answer],
                  [examples, shown_examples, ex_image, ex_question, ex_answer])
        drop.click(lambda: ([], describe([])), None, [examples, shown_examples])

        def ask(text, turns, files, video, items, max_new_tokens, mode, temp, p, n_beams, request: gr.Request):
            text = (text or "").strip()
            if not text:
                raise gr.Error("type a question first")
            paths = _paths(files)
            if len(paths) + len(items) > limits.max_images:
                raise gr.Error(f"at most {limits.max_images} images per question (in-context examples included)")
            try:
                pictures = [image_from_file(path, f"image {i + 1}", limits) for i, path in enumerate(paths)]
                context = [(image_from_file(path, f"example {i + 1}", limits), q, a) for i, (path, q, a) in enumerate(items)]
                settings = Settings(max_new_tokens=int(max_new_tokens), sample=mode == "sampling", temperature=temp,
                                    top_p=p, num_beams=1 if mode == "sampling" else int(n_beams))
            except (BadInput, ValueError) as exc:
                raise gr.Error(str(exc)) from None
            if limits.require_image and not pictures:
                raise gr.Error("upload an image first: this model answers questions about images")
            clip = None
            if video and video_frames:
                clip, pictures = _even_frames(pictures, video_frames), []
            chat = worker.chat(pictures, context, list(turns), settings, video=clip)
            try:
                ticket = worker.reserve()
            except Busy as exc:
                raise gr.Error(str(exc)) from None
            event = threading.Event()
            key = request.session_hash if request is not None else "local"
            stops[key] = event
            shown = [*_messages(turns), {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            answer = ""
            try:
                for piece in worker.stream(ticket, chat, text, settings, event):
                    answer += piece
                    shown[-1] = {"role": "assistant", "content": answer}
                    yield shown, turns, ""
            except VlmkitError as exc:
                raise gr.Error(str(exc)) from None
            finally:
                stops.pop(key, None)
            turns = list(turns) + [(text, answer)]
            yield _messages(turns), turns, ""

        def stop_now(request: gr.Request) -> None:
            event = stops.get(request.session_hash if request is not None else "local")
            if event is not None:
                event.set()

        inputs = [question, history, images, as_video, examples, max_new, decoding, temperature, top_p, beams]
        send.click(ask, inputs, [chatbot, history, question])
        question.submit(ask, inputs, [chatbot, history, question])
        stop.click(stop_now, None, None, queue=False)
        clear.click(lambda: ([], []), None, [chatbot, history])
    return app


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    shown: list[dict[str, str]] = []
    for q, a in turns:
        shown += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return shown
