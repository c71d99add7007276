"""The media worker: watermarked previews of image deliverables, and image URLs fetched safely."""
