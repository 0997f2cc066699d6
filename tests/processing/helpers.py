"""Files for the processing tests (and the API's): an EPS image, which the allow-list refuses,
and short videos whose frames tell their index by colour."""

import numpy as np

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


N_FRAMES, RATE, SIDE = 20, 10, 32


def frame_colour(i: int) -> tuple[int, int, int]:
    return (i * 12, 255 - i * 12, 128)  # red steps of 12 survive lossy coding: frame i reads back as i


def frame_index(image) -> int:
    return round(float(np.asarray(image)[..., 0].mean()) / 12)


def write_video(path, n=N_FRAMES, rate=RATE, container_format=None):
    import av  # optional ([video] extra): imported by the tests that need it

    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(n):
            pixels = np.empty((SIDE, SIDE, 3), np.uint8)
            pixels[...] = frame_colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
