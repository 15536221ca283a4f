import sidecar


def test_public_names_are_sorted_and_importable() -> None:
    assert sidecar.__all__ == sorted(sidecar.__all__)
    for name in sidecar.__all__:
        assert getattr(sidecar, name) is not None
