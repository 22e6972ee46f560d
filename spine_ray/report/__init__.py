"""`spine-ray report`: a static HTML report of a run (`build`), its plots (`plots`) and the
pictures of single studies (`studies`)."""
