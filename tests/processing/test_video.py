import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.video import (
    expand_video_conversations,
    expand_video_marker,
    probe_video,
    rate_indices,
    read_video,
    uniform_indices,
    with_video_frames,
)

from tests.processing.helpers import N_FRAMES, RATE, SIDE, frame_index, write_video

av = pytest.importorskip("av")



@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_uniform_sampling_takes_the_middle_frame_of_equal_segments(clip):
    frames, times = read_video(clip, num_frames=5)
    assert [frame_index(f) for f in frames] == [2, 6, 10, 14, 18]
    assert times == pytest.approx([0.2, 0.6, 1.0, 1.4, 1.8])
    assert all(f.mode == "RGB" and f.size == (SIDE, SIDE) for f in frames)


def test_uniform_sampling_is_capped_by_max_frames_and_by_the_clip(clip):
    frames, _ = read_video(clip, num_frames=8, max_frames=4)
    assert [frame_index(f) for f in frames] == [2, 7, 12, 17]
    frames, times = read_video(clip, num_frames=50, max_frames=64)
    assert [frame_index(f) for f in frames] == list(range(N_FRAMES))
    assert times == pytest.approx([i / RATE for i in range(N_FRAMES)])


def test_fixed_rate_sampling_takes_the_frame_on_screen_at_each_tick(clip):
    frames, times = read_video(clip, fps=4)  # ticks at 0, 0.25, ..., 1.75 s of a 10 fps clip
    assert [frame_index(f) for f in frames] == [0, 2, 5, 7, 10, 12, 15, 17]
    assert times == pytest.approx([0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7])
    frames, _ = read_video(clip, fps=1)
    assert [frame_index(f) for f in frames] == [0, 10]


def test_fixed_rate_sampling_never_repeats_a_frame_and_respects_max_frames(clip):
    frames, _ = read_video(clip, fps=25, max_frames=64)  # faster than the clip: each frame once
    assert [frame_index(f) for f in frames] == list(range(N_FRAMES))
    frames, _ = read_video(clip, fps=4, max_frames=3)  # 8 ticks > 3: uniform over the whole clip instead
    assert [frame_index(f) for f in frames] == [3, 10, 16]


def test_probe_knows_size_and_times_without_decoding(clip):
    probe = probe_video(clip, num_frames=4)
    assert probe.size == (SIDE, SIDE)
    assert len(probe.frame_times) == N_FRAMES
    assert probe.timestamps == pytest.approx([0.2, 0.7, 1.2, 1.7])


def test_index_helpers_on_edge_cases():
    assert uniform_indices(3, 1) == [1]
    assert uniform_indices(3, 7) == [0, 1, 2]
    assert rate_indices([0.0], fps=2, max_frames=4) == [0]


def test_missing_corrupt_and_frameless_videos_raise_data_errors_naming_the_file(tmp_path, clip):
    with pytest.raises(DataError, match="video file not found") as err:
        read_video(tmp_path / "nope.mp4")
    assert "nope.mp4" in str(err.value)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video at all" * 40)
    with pytest.raises(DataError, match="not a readable video") as err:
        read_video(junk)
    assert str(junk) in str(err.value)
    truncated = tmp_path / "truncated.mp4"  # mp4 keeps its index at the end: cut it off
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.mp4"):
        read_video(truncated)
    empty = write_video(tmp_path / "empty.avi", n=0)
    with pytest.raises(DataError, match="video has no frames") as err:
        read_video(empty)
    assert "empty.avi" in str(err.value)
    streamless = write_video(tmp_path / "empty.mp4", n=0)  # mp4 drops a stream that got no packet
    with pytest.raises(DataError, match="empty.mp4: has no video stream"):
        read_video(streamless)


def test_bad_sampling_settings_are_config_errors(clip):
    for kwargs in ({"num_frames": 0}, {"fps": 0}, {"max_frames": 0}):
        with pytest.raises(ConfigError):
            read_video(clip, **kwargs)


def test_video_marker_becomes_one_timed_image_marker_per_frame():
    text = expand_video_marker("<video>\nWhat changes?", [0.0, 0.5, 1.25])
    assert text == "0.0s: <image>\n0.5s: <image>\n1.2s: <image>\nWhat changes?"
    assert expand_video_marker("<video>", [0.0, 1.0], show_times=False) == "<image>\n<image>"
    with pytest.raises(DataError, match="2 <video> markers"):
        expand_video_marker("<video><video>", [0.0])


def test_conversations_expand_only_the_turn_with_the_marker():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\n<video>\nSame?"},
             {"role": "assistant", "content": "yes"}]
    out = expand_video_conversations(turns, [0.0, 1.0])
    assert out[1]["content"] == "<image>\n0.0s: <image>\n1.0s: <image>\nSame?"
    assert out[0] == turns[0] and turns[1]["content"] == "<image>\n<video>\nSame?"  # the input is left alone
    with pytest.raises(DataError, match="0 <video> markers"):
        expand_video_conversations(turns[:1], [0.0])


def test_frames_are_spliced_in_where_the_video_marker_stands():
    turns = [{"role": "user", "content": "<image>\n<video>\n<image>\nCompare."}, {"role": "assistant", "content": "x"}]
    expanded, items = with_video_frames(turns, ["a", "b"], ["f0", "f1", "f2"], [0.0, 0.5, 1.0], show_times=False)
    assert items == ["a", "f0", "f1", "f2", "b"]
    assert expanded[0]["content"].count("<image>") == len(items) and "<video>" not in expanded[0]["content"]
    later = [{"role": "user", "content": "<image>\nFirst."}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "<video>\nThen?"}, {"role": "assistant", "content": "y"}]
    assert with_video_frames(later, ["a"], ["f0"], [0.0])[1] == ["a", "f0"]
