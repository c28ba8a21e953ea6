"""Other tools' formats: an IMM network as a diffusers pipeline (:mod:`imm.interop.diffusers_pipeline`,
:mod:`imm.interop.export`)."""
