"""Test-only app for tests/test_browser_mask_painter.py: the painter on a generated picture, and what Python received.

The mask is written to $MASK_PAINTER_OUT after every run, for the test to compare pixel by pixel; the page shows its
size, white pixel count and bounding box, and the overlay the generation page would show.
"""
import os

import numpy as np
import streamlit as st
from PIL import Image

from app_pages.mask_painter import paint_mask
from core.tasks.images import mask_overlay

WIDTH, HEIGHT = 640, 480  # wider than the painter's display: strokes are scaled from screen to mask pixels

x, y = np.meshgrid(np.linspace(0, 255, WIDTH), np.linspace(0, 255, HEIGHT))
picture = Image.fromarray(np.dstack([x, y, 255 - x]).astype(np.uint8))
mask = paint_mask(picture, key="test_mask")
if mask is None:
    Image.new("L", picture.size, 0).save(os.environ["MASK_PAINTER_OUT"])
    st.markdown("mask stats: none")
else:
    mask.save(os.environ["MASK_PAINTER_OUT"])
    white = int(np.count_nonzero(np.asarray(mask)))
    st.markdown(f"mask stats: {mask.mode} {mask.width}x{mask.height}, {white} white pixels, bounding box {mask.getbbox()}")
    st.image(mask_overlay(picture, mask), caption="What Python received, over the picture")
