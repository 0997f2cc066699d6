"""vlmkit: build, train, serve and evaluate vision-language models and visual document retrievers.

Importing the package registers its classes with transformers' Auto factories, so a saved
vlmkit model loads with `AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from vlmkit.model.configuration import VLMConfig
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.processing.image_processing import VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor

__version__ = "0.1.0"

AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(VLMConfig, image_processor_classes={"pil": VLMImageProcessor}, exist_ok=True)
AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)

__all__ = ["VLMConfig", "VLMForConditionalGeneration", "VLMImageProcessor", "VLMProcessor", "__version__"]
