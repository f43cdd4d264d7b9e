"""Pictures of scenes, messages and detections."""
