"""VideoNSA as an lmms-eval model: ``lmms-eval --model videonsa --model_args pretrained=Enxin/VideoNSA ...``.

Installing this package registers the model with lmms-eval through the ``lmms_eval.models`` entry-point group
(``pyproject.toml``); lmms-eval calls [`model_manifest`] when it builds its model registry. This module stays free of
heavy imports because lmms-eval loads every entry point at start-up; the model class lives in
``videonsa.eval.model``. ``docs/evaluation.md`` gives the commands for the paper's benchmarks.
"""

MODEL_ID = "videonsa"
CHAT_CLASS_PATH = "videonsa.eval.model.VideoNSA"
SIMPLE_CLASS_PATH = "videonsa.eval.model.VideoNSASimple"


def model_manifest():
    """The ``ModelManifest`` lmms-eval registers: the chat class (messages built by the task) by default, the simple
    class (context string + visuals) under ``--force_simple``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH, simple_class_path=SIMPLE_CLASS_PATH)
