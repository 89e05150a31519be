"""The translation pass: every kept pair, asked of the same backend, into each of MIMIC-IT's 7 other
languages. The prompt keeps the English markers so that the answer parses like a task answer."""

from __future__ import annotations

__all__ = ["LANGUAGES", "translation_messages"]

#: code -> (name, a translated example: question, answer)
LANGUAGES: dict[str, tuple[str, str, str]] = {
    "zh": ("Chinese", "圆形是什么颜色？", "圆形是红色的。"),
    "ja": ("Japanese", "円は何色ですか？", "円は赤です。"),
    "es": ("Spanish", "¿De qué color es el círculo?", "El círculo es rojo."),
    "de": ("German", "Welche Farbe hat der Kreis?", "Der Kreis ist rot."),
    "fr": ("French", "De quelle couleur est le cercle ?", "Le cercle est rouge."),
    "ko": ("Korean", "원은 무슨 색입니까?", "원은 빨간색입니다."),
    "ar": ("Arabic", "ما لون الدائرة؟", "الدائرة حمراء."),
}
_EXAMPLE = ("What colour is the circle?", "The circle is red.")


def translation_messages(language: str, instruction: str, answer: str, question_marker: str = "Question:",
                         answer_marker: str = "Answer:") -> list[dict[str, str]]:
    name, q, a = LANGUAGES[language]
    system = (f"You are a translator. Translate the question and the answer from English into {name}. "
              f"Keep the markers '{question_marker}' and '{answer_marker}' in English, translate everything "
              "after them, and write nothing else.")

    def block(x: str, y: str) -> str:
        return f"{question_marker} {x}\n{answer_marker} {y}"

    return [{"role": "system", "content": system},
            {"role": "user", "content": block(*_EXAMPLE)},
            {"role": "assistant", "content": block(q, a)},
            {"role": "user", "content": block(instruction, answer)}]
