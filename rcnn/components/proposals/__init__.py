"""Region proposals: selective search (R-CNN, Fast R-CNN), proposals files, the RPN (Faster R-CNN)."""
