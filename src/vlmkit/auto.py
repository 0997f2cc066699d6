"""`import vlmkit.auto`: vlmkit's classes join transformers' Auto factories, so that a saved vlmkit
model loads with `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor`.

Each class registers itself where it is defined (`model/configuration.py`, `model/modeling.py`,
`processing/processor.py`); importing them is all this module does. `import vlmkit` alone
registers nothing and imports no machine-learning library, so that the command line starts
in a fraction of a second; `from vlmkit import VLMForConditionalGeneration` (or any of the
classes below) registers them too.
"""

from vlmkit.model.configuration import VLMConfig
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.processing.image_processing import VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor

__all__ = ["VLMConfig", "VLMForConditionalGeneration", "VLMImageProcessor", "VLMProcessor"]
