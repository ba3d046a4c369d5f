from hwkd.config import TeacherConfig, TrainConfig
from hwkd.teacher import teacher_key


def test_cache_key_changes_with_everything_that_shapes_the_teacher(tiny_dataset, monkeypatch):
    spec = {"kind": "zoo", "name": "cnn", "kwargs": {"num_classes": 3, "in_channels": 1, "width": 1.0}}
    base = teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig())
    assert base == teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig())
    assert base != teacher_key(spec, tiny_dataset, 1, TeacherConfig(), TrainConfig())
    assert base != teacher_key(spec, tiny_dataset, 0, TeacherConfig(epochs=3), TrainConfig())
    assert base != teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig(batch_size=32))
    tiny_dataset.source.images = tiny_dataset.source.images + 1.0  # other pixels, same shapes
    assert base != teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig())


def test_cache_key_changes_when_zoo_code_changes(tiny_dataset, monkeypatch):
    import hwkd.teacher as teacher

    spec = {"kind": "zoo", "name": "cnn", "kwargs": {}}
    before = teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig())
    monkeypatch.setattr(teacher, "zoo_code_fingerprint", lambda: "edited-architecture")
    assert teacher_key(spec, tiny_dataset, 0, TeacherConfig(), TrainConfig()) != before
