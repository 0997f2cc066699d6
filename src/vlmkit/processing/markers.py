"""The placeholders a record's text uses for its media: one `<image>` per image, one `<video>`
for a record's video (replaced by one `<image>` per sampled frame when the video is read).

Defined here, below both the records that write them and the processor that expands them, so
that `data` and `processing` need not import each other for them.
"""

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
