"""Draws the bundled sample pictures (no photos can be downloaded here). Run: python assets/samples/draw_samples.py"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def hot_dog() -> Image.Image:
    image = Image.new("RGB", (480, 360), (250, 244, 230))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((50, 150, 430, 260), radius=55, fill=(222, 170, 95))  # bun
    draw.rounded_rectangle((30, 170, 450, 220), radius=25, fill=(170, 60, 40))  # sausage
    points = [(60 + 30 * i, 185 if i % 2 else 200) for i in range(13)]
    draw.line(points, fill=(245, 200, 30), width=7)  # mustard
    draw.rounded_rectangle((60, 205, 420, 250), radius=40, fill=(205, 150, 80))
    return image


def salad() -> Image.Image:
    image = Image.new("RGB", (480, 360), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.pieslice((70, 80, 410, 340), 0, 180, fill=(240, 240, 240), outline=(160, 160, 160), width=4)  # bowl
    for x, y, colour in ((150, 190, (60, 150, 60)), (230, 170, (90, 180, 70)), (300, 195, (40, 120, 40)), (200, 205, (220, 50, 50)), (270, 215, (250, 160, 40))):
        draw.ellipse((x - 45, y - 30, x + 45, y + 30), fill=colour)
    return image


def beach() -> Image.Image:
    image = Image.new("RGB", (480, 360), (135, 200, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 190, 480, 260), fill=(30, 110, 190))  # sea
    draw.rectangle((0, 260, 480, 360), fill=(235, 210, 150))  # sand
    draw.ellipse((360, 40, 430, 110), fill=(255, 220, 60))  # sun
    return image


if __name__ == "__main__":
    for name, draw_picture in (("hot-dog", hot_dog), ("salad", salad), ("beach", beach)):
        draw_picture().save(HERE / f"{name}.png", optimize=True)
