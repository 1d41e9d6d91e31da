"""The methods HFedMoE is measured against (METHOD.md §9), one module each."""
