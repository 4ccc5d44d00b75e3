# Type stubs for ml_collections, which ships none: pyright would otherwise infer a ConfigDict's
# attributes from its implementation as a union of every value type (float | str | list | ...).
from ml_collections import config_dict as config_dict
from ml_collections.config_dict import ConfigDict as ConfigDict
from ml_collections.config_dict import FieldReference as FieldReference
from ml_collections.config_dict import FrozenConfigDict as FrozenConfigDict
