"""The model stages: stage 1 (`localize`: points per view), stage 2 (`grade`: crops → 25 grades),
the one-stage member (`onestage`), cross predictions on stage-1 variants (`cross`), the grading
losses, and `registry` (every stage by name; the one model loader)."""
