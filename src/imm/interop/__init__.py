"""Other tools: an IMM network as a diffusers pipeline (:mod:`~imm.interop.diffusers_pipeline`,
:mod:`~imm.interop.export`), a Hugging Face Hub repository (:mod:`~imm.interop.push`) and a Gradio page that
samples it (:mod:`~imm.interop.explore`)."""
