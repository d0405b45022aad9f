//! The live index: which segments of which model version are searchable, named by one manifest.
