"""chattune from Python: the public API over the code paths of the CLI.

```python
import chattune

run = chattune.train(model="smollm2-135m", method="lora", max_steps=200, output_dir="runs/lora")
bot = chattune.load(run)
print(bot.chat("Why is the sky blue?"))
answers = bot.generate(["What's the capital of Italy?", "Name three primes."], chattune.GREEDY)
print(chattune.evaluate(run, num_prompts=20))
chattune.export(run, "exported/lora")
```
Every command of the CLI (``chattune.cli``) is a thin layer over these functions: the
same settings, the same files, the same ``UserError`` messages (raised here, printed
there as one line with exit code 2).
"""

from chattune.api.chatbot import Answer, Chatbot, load
from chattune.api.comparison import CompareResult, compare
from chattune.api.results import EvalResult, Exported, evaluate, export
from chattune.api.runs import Run, train

__all__ = ["Answer", "Chatbot", "CompareResult", "EvalResult", "Exported", "Run", "compare", "evaluate", "export",
           "load", "train"]
