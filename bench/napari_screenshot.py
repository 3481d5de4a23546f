"""The screenshot of the napari plugin in docs/napari.md: the widget beside a segmentation of the
embedded synthetic EM sample, made in a real viewer under Xvfb.

    PYTHONPATH=. xvfb-run -a -s "-screen 0 1400x900x24" python bench/napari_screenshot.py --model RUN_DIR \
        [--output docs/images/napari.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import napari
from qtpy.QtWidgets import QApplication

from pipeline.files import io
from pipeline.napari_plugin import samples
from pipeline.napari_plugin.widget import SegmentWidget


def screenshot(model: Path, output: Path, width: int) -> None:
    """Opens the sample, segments it with `model` in the widget, saves the window scaled to `width` px."""
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="U-Net pipeline")
    for data, settings, kind in samples.synthetic_em():
        if kind == "image":
            layer = viewer.add_image(data, **settings)
    widget.model_path.value = str(model)
    widget.image.value = layer
    widget.segment()
    while widget.busy:
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.layers[f"{layer.name} cells"].opacity = 0.5
    QApplication.processEvents()
    rgba = viewer.screenshot(canvas_only=False, flash=False)
    scaled = cv2.resize(rgba[..., :3], (width, round(rgba.shape[0] * width / rgba.shape[1])),
                        interpolation=cv2.INTER_AREA)
    io.write_png(output, cv2.cvtColor(scaled, cv2.COLOR_RGB2BGR), overwrite=True)
    print(f"screenshot -> {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="what the widget's model field takes")
    parser.add_argument("--output", type=Path, default=Path("docs/images/napari.png"))
    parser.add_argument("--width", type=int, default=1000, help="width of the saved picture, px")
    args = parser.parse_args()
    screenshot(args.model, args.output, args.width)


if __name__ == "__main__":
    main()
